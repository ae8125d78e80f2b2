"""The index's bulk and inline paths give what the one-by-one and worker-thread paths give."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from imgsearch.api.common.v1 import common_pb2
from imgsearch.api.index.v1 import index_pb2
from imgsearch.index import convert
from imgsearch.index.core import RecordInput, SearchFilter, ShardIndex, Space
from imgsearch.index.settings import IndexSettings
from imgsearch.index.validation import stored, stored_rows
from imgsearch.kit.errors import InvalidArgument

VD, SD = 8, 4


def shard(path: Path, **overrides: Any) -> ShardIndex:
    base: dict[str, Any] = {
        "shard": "t",
        "data_dir": path,
        "visual_dim": VD,
        "semantic_dim": SD,
        "use_gpu": False,
        "background_build": False,
        "snapshot_every": 10**9,
        "snapshot_interval_seconds": 1e9,
    }
    base.update(overrides)
    return ShardIndex(IndexSettings(**base))


def test_stored_rows_equal_stored_and_leave_refusals_to_it() -> None:
    rng = np.random.default_rng(0)
    good = [rng.normal(size=VD).astype(np.float32) * s for s in (1e-3, 1.0, 1e30)]
    bad = [np.zeros(VD, np.float32), np.full(VD, np.nan, np.float32), np.ones(VD + 1, np.float32)]
    rows = stored_rows([*good, None, *bad], VD)
    for vec, row in zip(good, rows[:3], strict=True):
        assert row is not None
        np.testing.assert_array_equal(row, stored(vec, VD, "v"))
    assert rows[3:] == [None] * 4


def test_record_inputs_decode_like_record_input() -> None:
    rng = np.random.default_rng(1)
    v = [rng.normal(size=VD).astype(np.float32) for _ in range(3)]
    msgs = [
        index_pb2.Record(id="a", visual=common_pb2.FloatVector(packed_f16=v[0].astype("<f2").tobytes())),
        index_pb2.Record(id="b", visual=common_pb2.FloatVector(packed_f32=v[1].astype("<f4").tobytes())),
        index_pb2.Record(
            id="c",
            visual=common_pb2.FloatVector(packed_f16=v[2].astype("<f2").tobytes()),
            semantics=[
                index_pb2.SemanticVector(head="h@1", vector=common_pb2.FloatVector(values=[1.0, 2.0, 3.0, 4.0])),
                index_pb2.SemanticVector(head="h@2"),
            ],
        ),
        index_pb2.Record(id="d", visual=common_pb2.FloatVector(packed_f16=b"\x00\x3c\x00\x3c")),
    ]
    bulk = convert.record_inputs(msgs)
    for msg, got in zip(msgs, bulk, strict=True):
        one = convert.record_input(msg)
        assert got.id == one.id
        assert got.visual is not None and one.visual is not None
        np.testing.assert_array_equal(got.visual, one.visual)
        np.testing.assert_array_equal(got.visual, convert._array(msg.visual))
        assert [h for h, _ in got.semantics] == [h for h, _ in one.semantics]
    assert bulk[2].semantics[1][1] is None
    with pytest.raises(InvalidArgument, match="more than one"):
        convert.record_inputs([index_pb2.Record(id="x", visual=common_pb2.FloatVector(packed_f16=b"\0\0", values=[1]))])


def test_bulk_upsert_of_repeated_ids_matches_one_by_one(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)

    def rec(id_: str, album: str, heads: tuple[str, ...]) -> RecordInput:
        return RecordInput(
            id=id_,
            visual=rng.normal(size=VD).astype(np.float32),
            semantics=[(h, rng.normal(size=SD).astype(np.float32)) for h in heads],
            metadata={"album": album},
            thumbnail=album.encode(),
        )

    batch = [rec("a", "1", ("h@1",)), rec("b", "1", ("h@1",)), rec("a", "2", ("h@2",)), rec("c", "3", ("h@1",))]
    first = [rec("b", "0", ("h@1", "h@2"))]
    bulk, single = shard(tmp_path / "bulk"), shard(tmp_path / "single")
    try:
        bulk.upsert(first)
        single.upsert(first)
        got = bulk.upsert(batch)
        want = [single.upsert([r])[0] for r in batch]
        # Changed flags say whether the id was new before the request (a repeat within it is not).
        assert [(r.id, r.changed) for r in got] == [("a", True), ("b", False), ("a", False), ("c", True)]
        assert [r.id for r in want] == ["a", "b", "a", "c"]
        for idx in (bulk, single):
            idx.close(final_snapshot=False)
        bulk, single = shard(tmp_path / "bulk"), shard(tmp_path / "single")
        a, b = (idx.get(["a", "b", "c"], include_vectors=True)[0] for idx in (bulk, single))
        for x, y in zip(a, b, strict=True):
            assert (x.id, x.metadata, x.heads) == (y.id, y.metadata, y.heads)
            np.testing.assert_array_equal(x.visual, y.visual)
        assert (
            bulk.thumbnails(["a", "b", "c"])
            == single.thumbnails(["a", "b", "c"])
            == {
                "a": b"2",
                "b": b"1",
                "c": b"3",
            }
        )
        for idx in (bulk, single):
            res = idx.search(Space.SEMANTIC, np.ones(SD, np.float32), 10, semantic_head="h@2")
            assert [h.id for h in res.hits] == ["a"]
        terms = [("album", ["1"])]
        assert bulk._store.filter_labels(terms).tolist() == single._store.filter_labels(terms).tolist()
        assert sorted(bulk.get(["a", "b"])[0][i].metadata["album"] for i in range(2)) == ["1", "2"]
    finally:
        bulk.close(final_snapshot=False)
        single.close(final_snapshot=False)


def test_search_now_answers_like_search_and_never_waits(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    idx = shard(tmp_path)
    try:
        idx.upsert([RecordInput(id=f"r{i}", visual=rng.normal(size=VD).astype(np.float32)) for i in range(50)])
        q = rng.normal(size=VD).astype(np.float32)
        now = idx.search_now(Space.VISUAL, q, 5)
        assert now is not None
        assert now == idx.search(Space.VISUAL, q, 5)
        # Filters and cursors may scan much: never inline.
        assert idx.search_now(Space.VISUAL, q, 5, where=SearchFilter(terms=[("k", ["v"])])) is None
        # A writer holding (or waiting for) the lock: the inline search gives up rather than block the loop.
        held, release = threading.Event(), threading.Event()

        def writer() -> None:
            with idx._lock.write():
                held.set()
                release.wait(10)

        t = threading.Thread(target=writer)
        t.start()
        assert held.wait(10)
        try:
            assert idx.search_now(Space.VISUAL, q, 5) is None
        finally:
            release.set()
            t.join()
        assert idx.search_now(Space.VISUAL, q, 5) is not None
    finally:
        idx.close(final_snapshot=False)


def test_search_now_leaves_large_exact_scans_to_a_worker(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from imgsearch.index import core

    idx = shard(tmp_path)
    try:
        idx.upsert([RecordInput(id=f"r{i}", visual=np.eye(VD, dtype=np.float32)[i % VD]) for i in range(20)])
        monkeypatch.setattr(core, "INLINE_MAX_SCAN", 10 * VD)
        assert idx.search_now(Space.VISUAL, np.ones(VD, np.float32), 3) is None
        assert len(idx.search(Space.VISUAL, np.ones(VD, np.float32), 3).hits) == 3
    finally:
        idx.close(final_snapshot=False)
