"""ShardIndex with several heads: one vector per head per record, head configuration, required heads, migration."""

from __future__ import annotations

import json
import shutil
import sqlite3
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from imgsearch.index import snapshot
from imgsearch.index.core import HeadConfig, RecordInput, SemanticInput, ShardIndex, Space
from imgsearch.index.settings import IndexSettings
from imgsearch.index.store import DB_NAME
from imgsearch.kit.errors import FailedPrecondition, InvalidArgument

VD, SD = 16, 8
OLD, NEW = "proj@1", "proj@2"


def settings(path: Path) -> IndexSettings:
    return IndexSettings(
        data_dir=path,
        shard="heads",
        visual_dim=VD,
        semantic_dim=SD,
        snapshot_every=10**9,
        snapshot_interval_seconds=3600.0,
        use_gpu=False,
    )


def vec(rng: np.random.Generator, dim: int = SD) -> np.ndarray:
    return rng.normal(size=dim).astype(np.float32)


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x.astype(np.float64))).astype(np.float32)


def record(rng: np.random.Generator, id_: str, *heads: str, **kw: Any) -> RecordInput:
    """A record with a visual vector and one semantic vector per head, all in `semantics`."""
    return RecordInput(id=id_, visual=vec(rng, VD), semantics=[(h, vec(rng)) for h in heads], **kw)


@pytest.fixture()
def shard(tmp_path: Path) -> Iterator[ShardIndex]:
    idx = ShardIndex(settings(tmp_path / "s"))
    yield idx
    idx.close(final_snapshot=False)


def test_a_record_holds_one_vector_per_head(shard: ShardIndex, rng: np.random.Generator) -> None:
    legacy_vec = vec(rng)
    both = RecordInput(
        id="both", visual=vec(rng, VD), semantic=legacy_vec, semantic_head=OLD, semantics=[(NEW, vec(rng))]
    )
    results = shard.upsert([both, record(rng, "old", OLD), record(rng, "new", NEW)])
    assert [(r.id, r.changed, r.error) for r in results] == [
        ("both", True, None),
        ("old", True, None),
        ("new", True, None),
    ]
    assert shard.stats().semantic_heads == {OLD: 2, NEW: 2}
    (got,), _ = shard.get(["both"], include_vectors=True)
    assert got.heads == (OLD, NEW)
    np.testing.assert_allclose(got.semantics[OLD], unit(legacy_vec), atol=2e-3)
    new_vec = both.semantics[0][1]
    assert new_vec is not None
    np.testing.assert_allclose(got.semantics[NEW], unit(new_vec), atol=2e-3)
    # Each head's space finds the record by that head's vector, and only records of that head.
    for head, q in ((OLD, legacy_vec), (NEW, new_vec)):
        hits = shard.search(Space.SEMANTIC, q, 10, semantic_head=head).hits
        assert hits[0].id == "both"
        assert hits[0].score == pytest.approx(1.0, abs=2e-3)
        assert {h.id for h in hits} == {"both", "old" if head == OLD else "new"}
    # An upsert replaces the record with all its heads.
    shard.upsert([record(rng, "both", NEW)])
    assert shard.get(["both"])[0][0].heads == (NEW,)
    assert shard.stats().semantic_heads == {OLD: 1, NEW: 2}


BAD_SEMANTICS: list[tuple[dict[str, Any], str]] = [
    (
        {"semantic_head": OLD, "semantics": [(OLD, np.ones(SD, np.float32))]},
        f"semantics 0: a second vector of head '{OLD}' (semantic/semantic_head count as one entry)",
    ),
    (
        {"semantic_head": "", "semantics": [(NEW, np.ones(SD, np.float32)), (NEW, np.ones(SD, np.float32))]},
        f"semantics 1: a second vector of head '{NEW}'",
    ),
    ({"semantics": [("", np.ones(SD, np.float32))]}, "semantics 0: head is required"),
    ({"semantics": [(NEW, None)]}, f"semantics 0 (head '{NEW}') has no vector"),
    ({"semantics": [(NEW, np.ones(3, np.float32))]}, f"semantics 0 (head '{NEW}') vector has 3 values, expected {SD}"),
    ({"semantics": [("h" * 257, np.ones(SD, np.float32))]}, "semantics 0: head has 257 characters, at most 256"),
]


@pytest.mark.parametrize(("change", "message"), BAD_SEMANTICS, ids=[m for _, m in BAD_SEMANTICS])
def test_bad_semantics_fail_alone(
    shard: ShardIndex, rng: np.random.Generator, change: dict[str, Any], message: str
) -> None:
    base: dict[str, Any] = {"id": "bad", "visual": vec(rng, VD), "semantic": vec(rng), "semantic_head": OLD}
    if not change.get("semantic_head", OLD):
        base["semantic"] = None
    results = shard.upsert([record(rng, "a", OLD), RecordInput(**{**base, **change}), record(rng, "b", OLD)])
    assert [r.error is None for r in results] == [True, False, True]
    err = results[1].error
    assert err is not None
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT
    assert err.message.startswith("record 1 ('bad'): ")
    assert message in err.message
    assert shard.get(["bad"])[1] == ["bad"]


def test_set_semantic_keeps_other_heads_and_scan_skips_records_that_have_the_head(
    shard: ShardIndex, rng: np.random.Generator
) -> None:
    shard.upsert([record(rng, f"r{i}", OLD) for i in range(10)] + [record(rng, "visual-only")])
    assert [r.id for r in shard.scan(100, "", NEW).records] == [*[f"r{i}" for i in range(10)], "visual-only"]
    first = shard.scan(4, "", NEW)
    updates = [SemanticInput(r.id, vec(rng), NEW) for r in first.records]
    assert all(r.changed for r in shard.set_semantic(updates))
    # Skipped: records that already have a vector of the head, whatever other heads they have.
    assert [r.id for r in shard.scan(100, "", NEW).records] == [*[f"r{i}" for i in range(4, 10)], "visual-only"]
    assert [r.id for r in shard.scan(100, "", OLD).records] == ["visual-only"]
    (r0,), _ = shard.get(["r0"], include_vectors=True)
    assert r0.heads == (OLD, NEW)
    assert shard.stats().semantic_heads == {OLD: 10, NEW: 4}
    # A scanned record carries every head's vector.
    (page_r0,) = shard.scan(1).records
    assert set(page_r0.semantics) == {OLD, NEW}
    np.testing.assert_array_equal(page_r0.semantics[NEW], r0.semantics[NEW])


def test_head_config_epochs_are_monotonic_and_durable(tmp_path: Path, rng: np.random.Generator) -> None:
    idx = ShardIndex(settings(tmp_path / "s"))
    try:
        fresh = idx.head_state()
        assert (fresh.config, fresh.records, fresh.vectors_per_head, fresh.last_semantic_write_unix_ms) == (
            HeadConfig(0, "", ""),
            0,
            {},
            0,
        )
        idx.upsert([record(rng, f"r{i}", OLD) for i in range(3)])
        assert idx.set_head_config(HeadConfig(3, OLD, NEW)).config == HeadConfig(3, OLD, NEW)
        # Older and equal epochs lose silently; the answer names the configuration in force.
        assert idx.set_head_config(HeadConfig(2, NEW)).config == HeadConfig(3, OLD, NEW)
        assert idx.set_head_config(HeadConfig(3, NEW)).config == HeadConfig(3, OLD, NEW)
        assert idx.set_head_config(HeadConfig(0, "")).config == HeadConfig(3, OLD, NEW)
        with pytest.raises(InvalidArgument, match=r"^head configuration epoch 4 has no active head"):
            idx.set_head_config(HeadConfig(4, "", NEW))
        with pytest.raises(InvalidArgument, match=f"builds its active head '{OLD}'"):
            idx.set_head_config(HeadConfig(4, OLD, OLD))
        state = idx.head_state()
        assert (state.records, state.vectors_per_head) == (3, {OLD: 3, NEW: 0})
        idx.snapshot()
        assert idx.set_head_config(HeadConfig(7, NEW)).config == HeadConfig(7, NEW, "")
    finally:
        idx.close(final_snapshot=False)
    # Kept across a reopen from a snapshot, and across a rebuild (it lives in SQLite, not in the snapshot).
    idx = ShardIndex(settings(tmp_path / "s"))
    try:
        assert idx.load_report.mode == "snapshot"
        assert idx.head_state().config == HeadConfig(7, NEW, "")
    finally:
        idx.close(final_snapshot=False)
    shutil.rmtree(tmp_path / "s" / snapshot.SNAPSHOT_DIR)
    idx = ShardIndex(settings(tmp_path / "s"))
    try:
        assert idx.load_report.mode == "rebuild"
        assert idx.head_state().config == HeadConfig(7, NEW, "")
    finally:
        idx.close(final_snapshot=False)


def test_required_heads_are_checked_per_record(shard: ShardIndex, rng: np.random.Generator) -> None:
    # Before any configuration, anything goes, visual-only records included.
    assert all(r.error is None for r in shard.upsert([record(rng, "v0"), record(rng, "o0", OLD)]))
    shard.set_head_config(HeadConfig(7, OLD, NEW))
    results = shard.upsert(
        [record(rng, "dual", OLD, NEW), record(rng, "stale", OLD), record(rng, "bare"), record(rng, "dual2", NEW, OLD)]
    )
    assert [(r.id, r.error is None) for r in results] == [
        ("dual", True),
        ("stale", False),
        ("bare", False),
        ("dual2", True),
    ]
    stale, bare = results[1].error, results[2].error
    assert stale is not None and bare is not None
    assert (stale.code, bare.code) == (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.FAILED_PRECONDITION)
    assert stale.message.startswith(
        f"record 1 ('stale') has no semantic vector for head '{NEW}', which head configuration epoch 7 requires; "
        "the writer's head configuration is stale"
    )
    assert f"record 2 ('bare') has no semantic vector for head '{OLD}'" in bare.message
    assert shard.get(["stale", "bare"])[1] == ["stale", "bare"]
    # A bad record still gets INVALID_ARGUMENT (validation comes first); other heads are allowed too.
    mixed = shard.upsert([RecordInput(id="", visual=vec(rng, VD)), record(rng, "extra", OLD, NEW, "other@1")])
    assert [r.error.code if r.error else None for r in mixed] == [grpc.StatusCode.INVALID_ARGUMENT, None]
    state = shard.head_state()
    assert (state.records, state.vectors_per_head) == (5, {OLD: 4, NEW: 3, "other@1": 1})
    # SetSemantic and Delete are not held to the configuration: they are how a head gets built.
    assert shard.set_semantic([SemanticInput("o0", vec(rng), NEW)])[0].changed
    assert shard.delete(["v0"])[0].changed
    assert shard.head_state().vectors_per_head == {OLD: 4, NEW: 4, "other@1": 1}


def test_empty_head_search_and_legacy_fields_follow_the_active_head(
    shard: ShardIndex, rng: np.random.Generator
) -> None:
    records = [record(rng, f"r{i}", OLD, NEW) for i in range(12)]
    shard.upsert(records)
    q = vec(rng)
    with pytest.raises(FailedPrecondition, match="several heads"):
        shard.search(Space.SEMANTIC, q, 3)
    shard.set_head_config(HeadConfig(1, NEW, OLD))
    got = shard.search(Space.SEMANTIC, q, 3)
    assert got.head == NEW
    assert [h.id for h in got.hits] == [h.id for h in shard.search(Space.SEMANTIC, q, 3, semantic_head=NEW).hits]
    (r0,), _ = shard.get(["r0"], include_vectors=True)
    assert r0.semantic_head == NEW
    assert r0.semantic is not None
    np.testing.assert_array_equal(r0.semantic, r0.semantics[NEW])
    assert shard.scan(1).records[0].semantic_head == NEW
    # A configured active head of which the shard has no vectors is an empty space.
    shard.set_head_config(HeadConfig(2, "fresh@1"))
    assert (shard.search(Space.SEMANTIC, q, 3).hits, shard.search(Space.SEMANTIC, q, 3).head) == ([], "fresh@1")
    assert shard.get(["r0"])[0][0].semantic_head == OLD  # no vector of the active head: the first by name


def test_last_semantic_write_is_set_by_set_semantic_and_durable(tmp_path: Path, rng: np.random.Generator) -> None:
    idx = ShardIndex(settings(tmp_path / "s"))
    try:
        idx.upsert([record(rng, "a", OLD)])
        assert idx.head_state().last_semantic_write_unix_ms == 0
        idx.set_semantic([SemanticInput("a", vec(rng), NEW)])
        written = idx.head_state().last_semantic_write_unix_ms
        assert written > 0
        # An update of a missing id writes nothing.
        idx.set_semantic([SemanticInput("ghost", vec(rng), NEW)])
        assert idx.head_state().last_semantic_write_unix_ms == written
    finally:
        idx.close(final_snapshot=False)
    idx = ShardIndex(settings(tmp_path / "s"))
    try:
        assert idx.head_state().last_semantic_write_unix_ms == written
    finally:
        idx.close(final_snapshot=False)


# The schema as version 2 of store.py created it: one semantic vector per record, its head on the record.
V2_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE records (
    label INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    has_visual INTEGER NOT NULL,
    semantic_head TEXT,
    metadata TEXT NOT NULL,
    source_name TEXT NOT NULL,
    created_ms INTEGER NOT NULL,
    updated_ms INTEGER NOT NULL
);
CREATE TABLE vectors (
    label INTEGER PRIMARY KEY,
    visual BLOB,
    semantic BLOB,
    feature_norm REAL NOT NULL DEFAULT 0,
    top_logits BLOB
);
CREATE TABLE changes (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    op TEXT NOT NULL,
    label INTEGER NOT NULL,
    id TEXT NOT NULL,
    unix_ms INTEGER NOT NULL
);
"""


def test_a_version_2_database_moves_its_semantic_vectors_into_the_per_head_table(
    tmp_path: Path, rng: np.random.Generator
) -> None:
    directory = tmp_path / "s"
    directory.mkdir()
    heads = [OLD, NEW, None] * 5
    visual = {f"v2-{i}": unit(vec(rng, VD)) for i in range(15)}
    semantic = {f"v2-{i}": unit(vec(rng)) for i in range(15)}
    db = sqlite3.connect(directory / DB_NAME)
    with db:
        db.executescript(V2_SCHEMA)
        meta = {"schema_version": "2", "shard_uuid": uuid.uuid4().hex, "visual_dim": str(VD), "semantic_dim": str(SD)}
        db.executemany("INSERT INTO meta(key, value) VALUES (?, ?)", meta.items())
        for n, (id_, head) in enumerate(zip(visual, heads, strict=True)):
            (label,) = db.execute(
                "INSERT INTO records(id, has_visual, semantic_head, metadata, source_name, created_ms, updated_ms) "
                "VALUES (?, 1, ?, ?, ?, ?, ?) RETURNING label",
                (id_, head, json.dumps({"n": id_}), f"{id_}.jpg", 1000 + n, 1000 + n),
            ).fetchone()
            db.execute(
                "INSERT INTO vectors(label, visual, semantic, feature_norm) VALUES (?, ?, ?, 2.5)",
                (label, visual[id_].tobytes(), semantic[id_].tobytes() if head else None),
            )
            db.execute("INSERT INTO changes(op, label, id, unix_ms) VALUES ('upsert', ?, ?, 0)", (label, id_))
    db.close()
    idx = ShardIndex(settings(directory))
    try:
        assert (idx.load_report.mode, idx.load_report.records) == ("rebuild", 15)
        assert idx.stats().semantic_heads == {OLD: 5, NEW: 5}
        found, _ = idx.get(list(visual), include_vectors=True)
        for r, head in zip(found, heads, strict=True):
            assert r.heads == ((head,) if head else ())
            assert (r.semantic_head, r.feature_norm, r.created_ms) == (head, 2.5, 1000 + int(r.id[3:]))
            if head:
                np.testing.assert_array_equal(r.semantics[head], semantic[r.id].astype(np.float16).astype(np.float32))
            np.testing.assert_array_equal(r.visual, visual[r.id].astype(np.float16).astype(np.float32))
        hit = idx.search(Space.SEMANTIC, semantic["v2-1"], 1, semantic_head=NEW).hits[0]
        assert (hit.id, hit.metadata) == ("v2-1", {"n": "v2-1"})
        # Migrated records take a second head like any other.
        assert idx.set_semantic([SemanticInput("v2-0", vec(rng), NEW)])[0].changed
        assert idx.get(["v2-0"])[0][0].heads == (OLD, NEW)
    finally:
        idx.close()
    db = sqlite3.connect(directory / DB_NAME)
    version = db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()[0]
    records_columns = [row[1] for row in db.execute("PRAGMA table_info(records)")]
    vectors_columns = [row[1] for row in db.execute("PRAGMA table_info(vectors)")]
    (rows,) = db.execute("SELECT COUNT(*) FROM semantics").fetchone()
    db.close()
    assert (version, rows) == ("4", 11)
    assert "semantic_head" not in records_columns
    assert vectors_columns == ["label", "visual", "feature_norm", "top_logits"]
    idx = ShardIndex(settings(directory))
    try:
        assert idx.load_report.mode == "snapshot"
        assert idx.stats().semantic_heads == {OLD: 5, NEW: 6}
    finally:
        idx.close(final_snapshot=False)
