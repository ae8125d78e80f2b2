"""Thumbnails kept durably with their records: stored, replaced, deleted, limited, and still there after a restart."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from imgsearch.index.core import RecordInput, ShardIndex
from imgsearch.index.settings import IndexSettings
from imgsearch.kit.errors import InvalidArgument

VD, SD = 16, 8


def settings(path: Path) -> IndexSettings:
    return IndexSettings(
        data_dir=path,
        shard="thumbs",
        visual_dim=VD,
        semantic_dim=SD,
        snapshot_every=10**9,
        snapshot_interval_seconds=3600.0,
        use_gpu=False,
        max_thumbnail_bytes=1000,
    )


def record(rng: np.random.Generator, id_: str, thumbnail: bytes = b"") -> RecordInput:
    return RecordInput(id=id_, visual=rng.normal(size=VD).astype(np.float32), thumbnail=thumbnail)


def test_thumbnails_are_stored_replaced_deleted_and_durable(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    shard = ShardIndex(settings(tmp_path))
    results = shard.upsert(
        [record(rng, "a", b"jpeg-a"), record(rng, "b"), record(rng, "c", b"x" * 1001), record(rng, "d", b"jpeg-d")]
    )
    assert [r.error is None for r in results] == [True, True, False, True]
    error = results[2].error
    assert isinstance(error, InvalidArgument) and "thumbnail is 1001 bytes, at most 1000" in error.message
    assert shard.thumbnails(["a", "b", "c", "d", "nope"]) == {"a": b"jpeg-a", "d": b"jpeg-d"}
    # An upsert replaces the whole record, its thumbnail too; a delete removes it.
    shard.upsert([record(rng, "a", b"jpeg-a2"), record(rng, "d")])
    shard.delete(["b"])
    assert shard.thumbnails(["a", "b", "d"]) == {"a": b"jpeg-a2"}
    shard.close(final_snapshot=False)
    reopened = ShardIndex(settings(tmp_path))
    try:
        assert reopened.thumbnails(["a", "d"]) == {"a": b"jpeg-a2"}
    finally:
        reopened.close(final_snapshot=False)
