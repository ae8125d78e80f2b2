"""ShardIndex: write semantics, exact search against brute force, head policy, durability, snapshots, re-projection."""

from __future__ import annotations

import json
import re
import shutil
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Collection, Iterator, Sequence
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from imgsearch.index import snapshot
from imgsearch.index.core import RecordInput, SemanticInput, ShardIndex, Space
from imgsearch.index.settings import IndexSettings
from imgsearch.index.store import DB_NAME, StoredRecord
from imgsearch.kit.errors import FailedPrecondition, InvalidArgument, ResourceExhausted

VD, SD = 16, 8
HEAD = "proj@1"


def settings(path: Path, **overrides: Any) -> IndexSettings:
    base: dict[str, Any] = {
        "data_dir": path,
        "shard": "unit",
        "visual_dim": VD,
        "semantic_dim": SD,
        # Snapshots only when a test asks, unless it overrides these.
        "snapshot_every": 10**9,
        "snapshot_interval_seconds": 3600.0,
        "use_gpu": False,
    }
    base.update(overrides)
    return IndexSettings(**base)


def f16(vec: np.ndarray) -> np.ndarray:
    """What the shard stores of a normalised vector: float16 (schema 4), so ties break the same way."""
    return vec.astype(np.float32).astype(np.float16).astype(np.float64)


class Truth:
    """What the shard should hold, kept independently with numpy: the ground truth for exact search."""

    def __init__(self) -> None:
        self.visual: dict[str, np.ndarray] = {}
        # id -> head -> normalised vector: a record holds one vector per head.
        self.semantic: dict[str, dict[str, np.ndarray]] = {}
        self.meta: dict[str, dict[str, str]] = {}

    def put(self, rec: RecordInput) -> None:
        self.visual.pop(rec.id, None)
        self.semantic.pop(rec.id, None)
        if rec.visual is not None:
            self.visual[rec.id] = f16(rec.visual / np.linalg.norm(rec.visual.astype(np.float64)))
        pairs = [(rec.semantic_head, rec.semantic)] if rec.semantic is not None else []
        for head, vec in [*pairs, *rec.semantics]:
            assert vec is not None
            self.set_semantic(rec.id, head, vec)
        self.meta[rec.id] = dict(rec.metadata)

    def set_semantic(self, id_: str, head: str, vec: np.ndarray) -> None:
        self.semantic.setdefault(id_, {})[head] = f16(vec / np.linalg.norm(vec.astype(np.float64)))

    def drop(self, id_: str) -> None:
        self.visual.pop(id_, None)
        self.semantic.pop(id_, None)
        self.meta.pop(id_, None)

    def top(
        self, space: Space, query: np.ndarray, k: int, exclude: Collection[str] = (), head: str | None = None
    ) -> list[tuple[str, float]]:
        if space is Space.VISUAL:
            pool = {i: v for i, v in self.visual.items() if i not in exclude}
        else:
            # head None: the shard's only head (every vector of the truth is of it).
            pool = {
                i: v
                for i, heads in self.semantic.items()
                if i not in exclude
                for h, v in heads.items()
                if head in (None, h)
            }
        if not pool:
            return []
        ids = list(pool)
        q = query.astype(np.float64) / np.linalg.norm(query.astype(np.float64))
        scores = np.stack([pool[i] for i in ids]) @ q
        order = np.argsort(-scores)[:k]
        return [(ids[j], float(scores[j])) for j in order]


def vis(r: RecordInput) -> np.ndarray:
    assert r.visual is not None
    return r.visual


def sem(r: RecordInput) -> np.ndarray:
    assert r.semantic is not None
    return r.semantic


def rec(rng: np.random.Generator, id_: str, head: str | None = HEAD, **kw: Any) -> RecordInput:
    return RecordInput(
        id=id_,
        visual=rng.normal(size=VD).astype(np.float32),
        semantic=rng.normal(size=SD).astype(np.float32) if head else None,
        semantic_head=head or "",
        metadata=kw.pop("metadata", {"n": id_}),
        source_name=kw.pop("source_name", f"{id_}.jpg"),
        **kw,
    )


def assert_matches(
    idx: ShardIndex,
    truth: Truth,
    rng: np.random.Generator,
    space: Space = Space.VISUAL,
    head: str = "",
    queries: int = 5,
    k: int = 10,
) -> None:
    dim = VD if space is Space.VISUAL else SD
    for _ in range(queries):
        q = rng.normal(size=dim).astype(np.float32)
        got = idx.search(space, q, k, semantic_head=head)
        want = truth.top(space, q, k, head=head or None)
        assert [h.id for h in got.hits] == [i for i, _ in want]
        np.testing.assert_allclose([h.score for h in got.hits], [s for _, s in want], atol=2e-3)
        for h in got.hits:
            assert h.metadata == truth.meta[h.id]


@pytest.fixture()
def shard(tmp_path: Path) -> Iterator[ShardIndex]:
    idx = ShardIndex(settings(tmp_path / "shard"))
    yield idx
    idx.close(final_snapshot=False)


def fill(idx: ShardIndex, truth: Truth, rng: np.random.Generator, n: int, prefix: str = "img") -> list[str]:
    records = [rec(rng, f"{prefix}{i}") for i in range(n)]
    results = idx.upsert(records)
    assert all(r.error is None for r in results)
    for r in records:
        truth.put(r)
    return [r.id for r in records]


# --- write semantics ---


def test_upsert_reports_new_ids_and_replacements(shard: ShardIndex, rng: np.random.Generator) -> None:
    first = rec(rng, "a")
    assert [(r.id, r.changed) for r in shard.upsert([first])] == [("a", True)]
    replaced = rec(rng, "a", metadata={"v": "2"})
    assert [(r.id, r.changed) for r in shard.upsert([replaced])] == [("a", False)]
    # The same id twice in one batch: the second is a replacement of the first, and it wins.
    twice = [rec(rng, "b", metadata={"v": "1"}), rec(rng, "b", metadata={"v": "2"})]
    assert [r.changed for r in shard.upsert(twice)] == [True, False]
    found, missing = shard.get(["a", "b"], include_vectors=True)
    assert [r.metadata for r in found] == [{"v": "2"}, {"v": "2"}]
    assert missing == []
    assert found[1].visual is not None
    np.testing.assert_allclose(found[1].visual, vis(twice[1]) / np.linalg.norm(vis(twice[1])), atol=2e-3)
    assert shard.stats().count == 2


def test_delete_reports_whether_the_id_existed(shard: ShardIndex, rng: np.random.Generator) -> None:
    truth = Truth()
    fill(shard, truth, rng, 5)
    results = shard.delete(["img1", "ghost", "img1", "img3"])
    assert [(r.id, r.changed, r.error) for r in results] == [
        ("img1", True, None),
        ("ghost", False, None),
        ("img1", False, None),
        ("img3", True, None),
    ]
    truth.drop("img1")
    truth.drop("img3")
    assert shard.get(["img1", "img2", "img3"]) == (shard.get(["img2"])[0], ["img1", "img3"])
    assert_matches(shard, truth, rng)
    # A deleted id can come back, as a new record.
    again = rec(rng, "img1")
    assert shard.upsert([again])[0].changed is True
    truth.put(again)
    assert_matches(shard, truth, rng)


def test_delete_and_reinsert_in_one_batch_keeps_the_id_findable(shard: ShardIndex, rng: np.random.Generator) -> None:
    truth = Truth()
    fill(shard, truth, rng, 3)
    shard.delete(["img0"])
    # Delete of a missing id and upserts mixed with deletes all go through one write path.
    back = rec(rng, "img0")
    shard.upsert([back])
    shard.delete(["img0"])
    shard.upsert([back])
    truth.put(back)
    hit = shard.search(Space.VISUAL, vis(back), 1)
    assert hit.hits[0].id == "img0"
    assert hit.hits[0].score == pytest.approx(1.0, abs=2e-3)
    assert shard.stats().count == 3


def test_get_keeps_request_order_and_creation_time(shard: ShardIndex, rng: np.random.Generator) -> None:
    shard.upsert([rec(rng, "x"), rec(rng, "y"), rec(rng, "z", created_unix_ms=1_600_000_000_000)])
    found, missing = shard.get(["z", "nope", "x"])
    assert [r.id for r in found] == ["z", "x"]
    assert missing == ["nope"]
    assert found[0].created_ms == 1_600_000_000_000
    assert found[0].visual is None  # not asked for
    created_x = found[1].created_ms
    assert abs(created_x - time.time() * 1000) < 60_000
    time.sleep(0.01)
    shard.upsert([rec(rng, "x", metadata={"v": "new"})])
    (x,), _ = shard.get(["x"])
    assert x.metadata == {"v": "new"}
    assert x.created_ms == created_x  # a replacement keeps the creation time unless the caller sets one


BAD: list[tuple[dict[str, Any], str]] = [
    ({"id": ""}, "id must not be empty"),
    ({"id": "x" * 257}, "id has 257 characters, at most 256"),
    ({"visual": np.ones(VD + 1, np.float32)}, f"visual vector has {VD + 1} values, expected {VD}"),
    ({"semantic": np.ones(3, np.float32)}, f"semantic vector has 3 values, expected {SD}"),
    ({"visual": np.full(VD, np.nan, np.float32)}, "visual vector contains NaN or infinite values"),
    ({"visual": np.r_[np.ones(VD - 1), np.inf].astype(np.float32)}, "contains NaN or infinite"),
    ({"visual": np.zeros(VD, np.float32)}, "visual vector is all zeros"),
    ({"visual": None, "semantic": None, "semantic_head": ""}, "neither a visual nor a semantic vector"),
    ({"semantic_head": ""}, "semantic_head is required with a semantic vector"),
    ({"semantic": None}, "semantic_head 'proj@1' given without a semantic vector"),
    ({"metadata": {f"k{i}": "v" for i in range(65)}}, "65 metadata entries, at most 64"),
    ({"metadata": {"k": "v" * 16384}}, "metadata is 16385 bytes, at most 16384"),
    ({"source_name": "s" * 4097}, "source_name has 4097 characters"),
    ({"created_unix_ms": -1}, "created_unix_ms must not be negative"),
    ({"feature_norm": -0.5}, "feature_norm must be finite and not negative, got -0.5"),
    ({"feature_norm": float("nan")}, "feature_norm must be finite and not negative, got nan"),
    ({"feature_norm": float("inf")}, "feature_norm must be finite and not negative, got inf"),
    ({"feature_norm": 1e39}, "feature_norm must be finite and not negative, got 1e+39"),
    ({"top_logits": [(i, 1.0) for i in range(33)]}, "33 top_logits, at most 32 allowed"),
    ({"top_logits": [(3, 1.0), (10000, 0.5)]}, "top_logits 1 has class_index 10000, expected 0..9999"),
    ({"top_logits": [(-1, 1.0)]}, "top_logits 0 has class_index -1, expected 0..9999"),
    ({"top_logits": [(7, 2.0), (7, 1.0)]}, "top_logits 1 repeats class_index 7"),
    ({"top_logits": [(7, float("nan"))]}, "top_logits 0 (class_index 7) has logit nan"),
    ({"top_logits": [(7, 1.0), (8, float("-inf"))]}, "top_logits 1 (class_index 8) has logit -inf"),
]


@pytest.mark.parametrize(("change", "message"), BAD, ids=[m for _, m in BAD])
def test_a_bad_record_fails_alone(
    shard: ShardIndex, rng: np.random.Generator, change: dict[str, Any], message: str
) -> None:
    good_before, good_after = rec(rng, "good0"), rec(rng, "good1")
    base = rec(rng, "bad")
    fields = {**base.__dict__, **change}
    results = shard.upsert([good_before, RecordInput(**fields), good_after])
    assert [r.error is None for r in results] == [True, False, True]
    err = results[1].error
    assert err is not None
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT
    assert message in err.message
    assert err.message.startswith("record 1")
    assert shard.get(["good0", "good1", fields["id"]])[1] == [fields["id"]]
    assert shard.search(Space.VISUAL, vis(good_after), 1).hits[0].id == "good1"


def test_vectors_are_normalised_on_the_way_in(shard: ShardIndex, rng: np.random.Generator) -> None:
    big = rec(rng, "big")
    big = RecordInput(**{**big.__dict__, "visual": vis(big) * np.float32(1e30)})
    assert shard.upsert([big])[0].error is None
    (stored,), _ = shard.get(["big"], include_vectors=True)
    assert stored.visual is not None
    assert np.linalg.norm(stored.visual) == pytest.approx(1.0, abs=2e-3)
    assert shard.search(Space.VISUAL, vis(big), 1).hits[0].score == pytest.approx(1.0, abs=2e-3)


def test_too_many_records_is_resource_exhausted_and_stores_nothing(tmp_path: Path, rng: np.random.Generator) -> None:
    idx = ShardIndex(settings(tmp_path / "s", max_batch=4))
    try:
        with pytest.raises(ResourceExhausted, match="5 records in one request, at most 4"):
            idx.upsert([rec(rng, f"r{i}") for i in range(5)])
        with pytest.raises(ResourceExhausted, match="5 ids in one request"):
            idx.delete([f"r{i}" for i in range(5)])
        with pytest.raises(ResourceExhausted, match="5 ids in one request"):
            idx.get([f"r{i}" for i in range(5)])
        assert idx.stats().count == 0
        assert len(idx.upsert([rec(rng, f"r{i}") for i in range(4)])) == 4
    finally:
        idx.close(final_snapshot=False)


# --- search ---


def test_exact_search_equals_brute_force_through_deletes_and_replaces(
    shard: ShardIndex, rng: np.random.Generator
) -> None:
    truth = Truth()
    ids = fill(shard, truth, rng, 300)
    assert_matches(shard, truth, rng, Space.VISUAL, k=1)
    assert_matches(shard, truth, rng, Space.VISUAL, k=25)
    assert_matches(shard, truth, rng, Space.SEMANTIC, HEAD, k=25)
    gone = [str(i) for i in rng.choice(ids, size=60, replace=False)]
    assert sum(r.changed for r in shard.delete(gone)) == 60
    for i in gone:
        truth.drop(i)
    kept = [i for i in ids if i not in gone]
    replacements = [rec(rng, str(i)) for i in rng.choice(kept, size=50, replace=False)]
    assert not any(r.changed for r in shard.upsert(replacements))
    for r in replacements:
        truth.put(r)
    assert_matches(shard, truth, rng, Space.VISUAL, k=25)
    assert_matches(shard, truth, rng, Space.SEMANTIC, HEAD, k=25)
    # k larger than the shard returns everything, ranked.
    assert_matches(shard, truth, rng, Space.VISUAL, k=1000, queries=2)
    assert shard.search(Space.VISUAL, rng.normal(size=VD).astype(np.float32), 5).searched == 240


def test_exclude_ids_are_never_returned_and_k_is_still_filled(shard: ShardIndex, rng: np.random.Generator) -> None:
    truth = Truth()
    fill(shard, truth, rng, 50)
    q = rng.normal(size=VD).astype(np.float32)
    nearest = [i for i, _ in truth.top(Space.VISUAL, q, 8)]
    exclude = [*nearest[:5], "not-stored"]
    got = shard.search(Space.VISUAL, q, 10, exclude_ids=exclude)
    assert [h.id for h in got.hits] == [i for i, _ in truth.top(Space.VISUAL, q, 10, exclude=set(exclude))]
    assert len(got.hits) == 10
    # Excluding everything leaves nothing.
    assert shard.search(Space.VISUAL, q, 10, exclude_ids=list(truth.visual)).hits == []


def test_search_argument_errors(tmp_path: Path, rng: np.random.Generator) -> None:
    idx = ShardIndex(settings(tmp_path / "s", max_exclude_ids=3))
    try:
        fill(idx, Truth(), rng, 3)
        q = rng.normal(size=VD).astype(np.float32)
        with pytest.raises(InvalidArgument, match=r"^k must be between 1 and 1000, got 0$"):
            idx.search(Space.VISUAL, q, 0)
        with pytest.raises(InvalidArgument, match="k must be between 1 and 1000, got 100000"):
            idx.search(Space.VISUAL, q, 100_000)
        with pytest.raises(InvalidArgument, match=f"query for the semantic space has {VD} values, expected {SD}"):
            idx.search(Space.SEMANTIC, q, 1)
        with pytest.raises(InvalidArgument, match="all zeros"):
            idx.search(Space.VISUAL, np.zeros(VD, np.float32), 1)
        with pytest.raises(InvalidArgument, match="NaN"):
            idx.search(Space.VISUAL, np.full(VD, np.nan, np.float32), 1)
        with pytest.raises(ResourceExhausted, match="4 exclude_ids, at most 3"):
            idx.search(Space.VISUAL, q, 1, exclude_ids=["a", "b", "c", "d"])
    finally:
        idx.close(final_snapshot=False)


# --- semantic heads ---


def test_query_of_a_head_the_shard_lacks_is_an_empty_space(shard: ShardIndex, rng: np.random.Generator) -> None:
    truth = Truth()
    fill(shard, truth, rng, 20)
    q = rng.normal(size=SD).astype(np.float32)
    # Never another head's vectors: during a build a shard may hold none of the new head yet, which is no error.
    got = shard.search(Space.SEMANTIC, q, 5, semantic_head="proj@2")
    assert (got.hits, got.searched, got.head) == ([], 0, "proj@2")
    # An empty head means "the shard's one head".
    assert_matches(shard, truth, rng, Space.SEMANTIC, "")
    assert shard.search(Space.SEMANTIC, q, 5).head == HEAD
    # The visual space has no heads: a head given with a visual query is not checked against anything.
    assert len(shard.search(Space.VISUAL, rng.normal(size=VD).astype(np.float32), 5, semantic_head="x").hits) == 5


def test_two_heads_are_searched_apart(shard: ShardIndex, rng: np.random.Generator) -> None:
    truth = Truth()
    old = [rec(rng, f"old{i}", head="proj@1") for i in range(30)]
    new = [rec(rng, f"new{i}", head="proj@2") for i in range(20)]
    shard.upsert(old + new)
    for r in old + new:
        truth.put(r)
    assert shard.stats().semantic_heads == {"proj@1": 30, "proj@2": 20}
    assert_matches(shard, truth, rng, Space.SEMANTIC, "proj@1", k=40)
    assert_matches(shard, truth, rng, Space.SEMANTIC, "proj@2", k=40)
    got = shard.search(Space.SEMANTIC, rng.normal(size=SD).astype(np.float32), 100, semantic_head="proj@2")
    assert {h.id for h in got.hits} == {r.id for r in new}
    assert got.searched == 20
    several = re.escape("several heads ('proj@1', 'proj@2') and has no head configuration; set semantic_head")
    with pytest.raises(FailedPrecondition, match=several):
        shard.search(Space.SEMANTIC, rng.normal(size=SD).astype(np.float32), 5)
    assert shard.search(Space.SEMANTIC, rng.normal(size=SD).astype(np.float32), 5, semantic_head="proj@3").hits == []
    # Re-indexing the old records with the new head moves them; the old head disappears once empty.
    moved = [rec(rng, r.id, head="proj@2") for r in old]
    shard.upsert(moved)
    for r in moved:
        truth.put(r)
    assert shard.stats().semantic_heads == {"proj@2": 50}
    assert_matches(shard, truth, rng, Space.SEMANTIC, "", k=60)


def test_semantic_search_of_a_shard_without_semantic_vectors_is_empty(
    shard: ShardIndex, rng: np.random.Generator
) -> None:
    q = rng.normal(size=SD).astype(np.float32)
    assert shard.search(Space.SEMANTIC, q, 5, semantic_head="proj@9").hits == []
    shard.upsert([rec(rng, "visual-only", head=None)])
    got = shard.search(Space.SEMANTIC, q, 5)
    assert (got.hits, got.searched) == ([], 0)
    assert shard.search(Space.VISUAL, rng.normal(size=VD).astype(np.float32), 5).hits[0].id == "visual-only"


# --- durability and snapshots ---


def queries(rng: np.random.Generator, n: int = 6) -> list[tuple[Space, np.ndarray]]:
    return [(Space.VISUAL, rng.normal(size=VD).astype(np.float32)) for _ in range(n)] + [
        (Space.SEMANTIC, rng.normal(size=SD).astype(np.float32)) for _ in range(n)
    ]


def answers(idx: ShardIndex, qs: Sequence[tuple[Space, np.ndarray]]) -> list[list[tuple[str, float]]]:
    return [[(h.id, h.score) for h in idx.search(space, q, 20).hits] for space, q in qs]


def mutate(idx: ShardIndex, truth: Truth, rng: np.random.Generator, tag: str) -> int:
    """Inserts, replaces and deletes; returns the number of changes."""
    fresh = [rec(rng, f"{tag}{i}") for i in range(30)]
    idx.upsert(fresh)
    existing = sorted(truth.visual)
    replaced = [rec(rng, i) for i in existing[:10]]
    idx.upsert(replaced)
    gone = existing[10:25]
    idx.delete(gone)
    for r in fresh + replaced:
        truth.put(r)
    for i in gone:
        truth.drop(i)
    return len(fresh) + len(replaced) + len(gone)


def test_close_and_reopen_gives_identical_results(tmp_path: Path, rng: np.random.Generator) -> None:
    truth = Truth()
    idx = ShardIndex(settings(tmp_path / "s"))
    fill(idx, truth, rng, 200)
    mutate(idx, truth, rng, "m")
    qs = queries(rng)
    before = answers(idx, qs)
    stats_before = idx.stats()
    idx.close()
    idx = ShardIndex(settings(tmp_path / "s"))
    try:
        assert idx.load_report.mode == "snapshot"
        assert idx.load_report.replayed_changes == 0
        assert answers(idx, qs) == before
        after = idx.stats()
        assert (after.count, after.semantic_heads) == (stats_before.count, stats_before.semantic_heads)
        assert after.wal_entries == 0
        assert after.last_snapshot_unix_ms > 0
        assert_matches(idx, truth, rng)
    finally:
        idx.close(final_snapshot=False)


@pytest.mark.parametrize(("before", "after"), [("Flat", "SQfp16"), ("SQfp16", "Flat")])
def test_changing_the_exact_kind_keeps_the_snapshot_and_the_answers(
    tmp_path: Path, rng: np.random.Generator, before: str, after: str
) -> None:
    # Both exact kinds hold the float16 vectors the shard stores: a shard reopened under the other kind loads its
    # snapshot (no rebuild from SQLite), converts the tails, and answers as before and as the ground truth.
    truth = Truth()
    idx = ShardIndex(settings(tmp_path / "s", index_type=before))
    fill(idx, truth, rng, 200)
    mutate(idx, truth, rng, "m")
    qs = queries(rng)
    answered = answers(idx, qs)
    assert idx.stats().index_type == before
    idx.close()
    idx = ShardIndex(settings(tmp_path / "s", index_type=after))
    try:
        assert idx.load_report.mode == "snapshot"
        assert idx.stats().index_type == after
        for now, then in zip(answers(idx, qs), answered, strict=True):
            assert [hit_id for hit_id, _ in now] == [hit_id for hit_id, _ in then]
            np.testing.assert_allclose([score for _, score in now], [score for _, score in then], atol=1e-5)
        assert_matches(idx, truth, rng)
        assert_matches(idx, truth, rng, Space.SEMANTIC, HEAD)
        # Writes after the switch go to a tail of the new kind and are found.
        extra = rec(rng, "after-switch")
        idx.upsert([extra])
        truth.put(extra)
        assert_matches(idx, truth, rng)
    finally:
        idx.close(final_snapshot=False)


def test_the_float16_kind_ranks_as_exact_flat(tmp_path: Path, rng: np.random.Generator) -> None:
    # The same writes into one shard of each exact kind: the same ids in the same order, scores equal to 1e-5.
    shards = {kind: ShardIndex(settings(tmp_path / kind, index_type=kind)) for kind in ("Flat", "SQfp16")}
    try:
        records = [rec(rng, f"r{i}") for i in range(300)]
        for shard in shards.values():
            shard.upsert(records)
            shard.delete([f"r{i}" for i in range(0, 300, 7)])
        for _ in range(10):
            q = rng.normal(size=VD).astype(np.float32)
            flat, half = (shards[k].search(Space.VISUAL, q, 20).hits for k in ("Flat", "SQfp16"))
            assert [h.id for h in half] == [h.id for h in flat]
            np.testing.assert_allclose([h.score for h in half], [h.score for h in flat], atol=1e-5)
    finally:
        for shard in shards.values():
            shard.close(final_snapshot=False)


def test_without_any_snapshot_a_reopen_rebuilds_from_sqlite(tmp_path: Path, rng: np.random.Generator) -> None:
    truth = Truth()
    idx = ShardIndex(settings(tmp_path / "s"))
    fill(idx, truth, rng, 100)
    mutate(idx, truth, rng, "m")
    qs = queries(rng)
    before = answers(idx, qs)
    idx.close(final_snapshot=False)  # what a crash leaves
    assert snapshot.newest(tmp_path / "s") is None
    idx = ShardIndex(settings(tmp_path / "s"))
    try:
        assert idx.load_report.mode == "rebuild"
        assert answers(idx, qs) == before
        assert_matches(idx, truth, rng, Space.SEMANTIC, HEAD)
    finally:
        idx.close(final_snapshot=False)


def test_changes_after_a_snapshot_are_replayed(tmp_path: Path, rng: np.random.Generator) -> None:
    truth = Truth()
    idx = ShardIndex(settings(tmp_path / "s"))
    fill(idx, truth, rng, 150)
    assert idx.snapshot() is True
    assert idx.snapshot() is False  # nothing new
    snap_seq = int(snapshot.newest(tmp_path / "s").name.split("-")[1])  # type: ignore[union-attr]
    assert idx.stats().wal_entries == 0
    changes = mutate(idx, truth, rng, "late")
    # A head change after the snapshot must move the vector between head indexes on replay too.
    moved = rec(rng, "img0", head="proj@2")
    idx.upsert([moved])
    truth.put(moved)
    assert idx.stats().wal_entries == changes + 1
    # Visual queries only: with two heads, a semantic query must name one.
    qs = [(s, q) for s, q in queries(rng) if s is Space.VISUAL]
    before = answers(idx, qs)
    idx.close(final_snapshot=False)
    idx = ShardIndex(settings(tmp_path / "s"))
    try:
        assert idx.load_report.mode == "snapshot"
        assert idx.load_report.replayed_changes == changes + 1
        assert int(snapshot.newest(tmp_path / "s").name.split("-")[1]) == snap_seq  # type: ignore[union-attr]
        assert idx.stats().wal_entries == changes + 1
        assert idx.stats().semantic_heads == {HEAD: 164, "proj@2": 1}
        assert answers(idx, qs) == before
        assert_matches(idx, truth, rng, Space.VISUAL, k=50)
        assert_matches(idx, truth, rng, Space.SEMANTIC, HEAD, k=50)
        assert [h.id for h in idx.search(Space.SEMANTIC, sem(moved), 5, semantic_head="proj@2").hits] == ["img0"]
    finally:
        idx.close(final_snapshot=False)


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


CORRUPTIONS: dict[str, Callable[[Path], object]] = {
    "flipped byte": lambda d: _flip_byte(d / "visual.faiss"),
    "truncated index": lambda d: (d / "semantic-0.faiss").write_bytes((d / "semantic-0.faiss").read_bytes()[:100]),
    "missing index": lambda d: (d / "visual.faiss").unlink(),
    "garbage manifest": lambda d: (d / "manifest.json").write_bytes(b"\x00\xff not json"),
    "manifest from the future": lambda d: (d / "manifest.json").write_text(
        (d / "manifest.json").read_text().replace('"seq": ', '"seq": 1000')
    ),
}


@pytest.mark.parametrize("corrupt", list(CORRUPTIONS))
def test_a_corrupt_snapshot_falls_back_to_a_full_rebuild(
    tmp_path: Path, rng: np.random.Generator, corrupt: str
) -> None:
    truth = Truth()
    idx = ShardIndex(settings(tmp_path / "s"))
    fill(idx, truth, rng, 120)
    idx.snapshot()
    mutate(idx, truth, rng, "after")
    qs = queries(rng)
    before = answers(idx, qs)
    idx.close(final_snapshot=False)
    newest = snapshot.newest(tmp_path / "s")
    assert newest is not None
    CORRUPTIONS[corrupt](newest)
    (tmp_path / "s" / "snapshots" / ".tmp-7-1").mkdir()  # debris of a crash mid-snapshot
    idx = ShardIndex(settings(tmp_path / "s"))
    try:
        assert idx.load_report.mode == "rebuild"
        assert newest.name in idx.load_report.reason
        assert answers(idx, qs) == before
        assert_matches(idx, truth, rng, Space.SEMANTIC, HEAD)
        assert not (tmp_path / "s" / "snapshots" / ".tmp-7-1").exists()
        # The background thread replaces the bad snapshot so the next start is fast again.
        deadline = time.monotonic() + 10
        while idx.stats().last_snapshot_unix_ms == 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert idx.stats().last_snapshot_unix_ms > 0
    finally:
        idx.close(final_snapshot=False)
    idx = ShardIndex(settings(tmp_path / "s"))
    try:
        assert idx.load_report.mode == "snapshot"
        assert answers(idx, qs) == before
    finally:
        idx.close(final_snapshot=False)


def test_a_snapshot_of_another_database_is_not_used(tmp_path: Path, rng: np.random.Generator) -> None:
    truth = Truth()
    other = ShardIndex(settings(tmp_path / "other"))
    fill(other, Truth(), rng, 40)
    other.close()
    idx = ShardIndex(settings(tmp_path / "s"))
    fill(idx, truth, rng, 40, prefix="mine")
    idx.close(final_snapshot=False)
    src = snapshot.newest(tmp_path / "other")
    assert src is not None
    dst = tmp_path / "s" / "snapshots" / src.name
    dst.parent.mkdir()
    src.rename(dst)
    idx = ShardIndex(settings(tmp_path / "s"))
    try:
        assert idx.load_report.mode == "rebuild"
        assert "shard_uuid" in idx.load_report.reason
        assert_matches(idx, truth, rng)
        # Its own snapshot has the same seq (40) as the foreign one: it must replace it.
        deadline = time.monotonic() + 10
        while idx.stats().last_snapshot_unix_ms == 0 and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        idx.close(final_snapshot=False)
    assert [p.name for p in (tmp_path / "s" / "snapshots").iterdir()] == [src.name]
    idx = ShardIndex(settings(tmp_path / "s"))
    try:
        assert idx.load_report.mode == "snapshot"
        assert_matches(idx, truth, rng)
    finally:
        idx.close(final_snapshot=False)


def test_background_snapshot_after_snapshot_every_changes(tmp_path: Path, rng: np.random.Generator) -> None:
    idx = ShardIndex(settings(tmp_path / "s", snapshot_every=25))
    try:
        fill(idx, Truth(), rng, 10)
        time.sleep(0.2)
        assert idx.stats().last_snapshot_unix_ms == 0  # below the threshold
        fill(idx, Truth(), rng, 20, prefix="more")
        deadline = time.monotonic() + 10
        while idx.stats().wal_entries and time.monotonic() < deadline:
            time.sleep(0.02)
        stats = idx.stats()
        assert stats.wal_entries == 0
        assert stats.last_snapshot_unix_ms > 0
        assert idx.snapshot_age_seconds() < 10
    finally:
        idx.close(final_snapshot=False)


def test_background_snapshot_after_the_interval(tmp_path: Path, rng: np.random.Generator) -> None:
    idx = ShardIndex(settings(tmp_path / "s", snapshot_interval_seconds=0.3))
    try:
        fill(idx, Truth(), rng, 3)
        deadline = time.monotonic() + 10
        while idx.stats().last_snapshot_unix_ms == 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert idx.stats().wal_entries == 0
    finally:
        idx.close(final_snapshot=False)


def test_reopening_with_other_dimensions_is_refused(tmp_path: Path, rng: np.random.Generator) -> None:
    idx = ShardIndex(settings(tmp_path / "s"))
    fill(idx, Truth(), rng, 3)
    idx.close()
    with pytest.raises(FailedPrecondition, match=f"created with visual_dim={VD}, but the settings say 32"):
        ShardIndex(settings(tmp_path / "s", visual_dim=32))
    idx = ShardIndex(settings(tmp_path / "s"))
    assert idx.stats().count == 3
    idx.close()


def test_searches_stay_consistent_while_writes_happen(shard: ShardIndex, rng: np.random.Generator) -> None:
    truth = Truth()
    fill(shard, truth, rng, 200)
    errors: list[BaseException] = []
    stop = threading.Event()

    def searcher(seed: int) -> None:
        local = np.random.default_rng(seed)
        while not stop.is_set():
            try:
                got = shard.search(Space.VISUAL, local.normal(size=VD).astype(np.float32), 10)
                scores = [h.score for h in got.hits]
                assert scores == sorted(scores, reverse=True)
                assert len({h.id for h in got.hits}) == len(got.hits)
            except BaseException as exc:
                errors.append(exc)
                return

    threads = [threading.Thread(target=searcher, args=(s,)) for s in range(3)]
    for t in threads:
        t.start()
    try:
        for round_ in range(15):
            mutate(shard, truth, rng, f"r{round_}-")
        shard.snapshot()
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert errors == []
    assert_matches(shard, truth, rng, Space.VISUAL, k=30)
    assert_matches(shard, truth, rng, Space.SEMANTIC, HEAD, k=30)


def test_stats_follow_writes_and_snapshots(shard: ShardIndex, rng: np.random.Generator) -> None:
    stats = shard.stats()
    assert (stats.shard, stats.count, stats.index_type, stats.visual_dim, stats.semantic_dim) == (
        "unit",
        0,
        "SQfp16",
        VD,
        SD,
    )
    shard.upsert([rec(rng, "a"), rec(rng, "b", head=None), rec(rng, "c", head="other@1")])
    shard.delete(["a", "zzz"])
    stats = shard.stats()
    assert (stats.count, stats.visual_count, stats.semantic_heads, stats.wal_entries) == (2, 2, {"other@1": 1}, 4)
    assert stats.last_snapshot_unix_ms == 0
    shard.snapshot()
    stats = shard.stats()
    assert stats.wal_entries == 0
    assert abs(stats.last_snapshot_unix_ms - time.time() * 1000) < 60_000


def test_a_full_disk_fails_the_whole_request_and_keeps_the_shard_consistent(
    shard: ShardIndex, rng: np.random.Generator
) -> None:
    truth = Truth()
    fill(shard, truth, rng, 20)
    wal = shard.stats().wal_entries
    # SQLite's page limit produces the same error as a full disk ("database or disk is full").
    db = shard._store._db
    (pages,) = db.execute("PRAGMA page_count").fetchone()
    db.execute(f"PRAGMA max_page_count = {pages + 1}")
    with pytest.raises(ResourceExhausted, match=r"storage is full .*nothing from this request was stored"):
        shard.upsert([rec(rng, f"late{i}") for i in range(300)])
    assert (shard.stats().count, shard.stats().wal_entries) == (20, wal)
    assert shard.get(["late0"])[1] == ["late0"]
    assert_matches(shard, truth, rng)
    db.execute("PRAGMA max_page_count = 1073741823")
    fill(shard, truth, rng, 10, prefix="late")
    assert_matches(shard, truth, rng)


def test_a_snapshot_older_than_the_pruned_log_is_not_used(tmp_path: Path, rng: np.random.Generator) -> None:
    truth = Truth()
    idx = ShardIndex(settings(tmp_path / "s"))
    fill(idx, truth, rng, 50)
    idx.snapshot()
    old = snapshot.newest(tmp_path / "s")
    assert old is not None
    saved = tmp_path / "saved"
    old.rename(saved)
    # Replacements keep their labels: replaying from the old snapshot without the pruned changes would
    # keep the old vectors while the label sets still agree.
    replaced = [rec(rng, f"img{i}") for i in range(20)]
    idx.upsert(replaced)
    for r in replaced:
        truth.put(r)
    idx.snapshot()  # prunes the changes above from the log
    last = rec(rng, "img0")
    idx.upsert([last])
    truth.put(last)
    idx.close(final_snapshot=False)
    newest = snapshot.newest(tmp_path / "s")
    assert newest is not None
    shutil.rmtree(newest)
    saved.rename(old)
    idx = ShardIndex(settings(tmp_path / "s"))
    try:
        assert idx.load_report.mode == "rebuild"
        assert "oldest change still logged" in idx.load_report.reason
        assert_matches(idx, truth, rng, Space.VISUAL, k=30)
        assert_matches(idx, truth, rng, Space.SEMANTIC, HEAD, k=30)
    finally:
        idx.close(final_snapshot=False)


# --- re-projection: feature norms, top logits, Scan and SetSemantic ---


def signals(rng: np.random.Generator, n: int = 5) -> dict[str, Any]:
    """A feature norm and top logits as the gateway sends them: float32 values, distinct classes, highest first."""
    classes = rng.choice(1000, size=n, replace=False)
    logits = np.sort(rng.normal(size=n).astype(np.float32) * 5)[::-1]
    return {
        "feature_norm": float(np.float32(rng.uniform(1, 40))),
        "top_logits": [(int(c), float(v)) for c, v in zip(classes, logits, strict=True)],
    }


def signal_of(r: StoredRecord) -> tuple[float, list[tuple[int, float]]]:
    return r.feature_norm, list(r.top_logits)


def scan_all(idx: ShardIndex, page_size: int, skip: str = "") -> list[list[StoredRecord]]:
    pages: list[list[StoredRecord]] = []
    token = ""
    while True:
        page = idx.scan(page_size, token, skip)
        pages.append(page.records)
        token = page.next_page_token
        if not token:
            return pages


def test_feature_norm_and_top_logits_round_trip(tmp_path: Path, rng: np.random.Generator) -> None:
    idx = ShardIndex(settings(tmp_path / "s"))
    sent: dict[str, tuple[float, list[tuple[int, float]]]] = {}
    try:
        records = [rec(rng, f"sig{i}", **signals(rng, 1 + i % 32)) for i in range(40)]
        # The limits themselves are fine: 32 pairs, classes 0 and 9999, a zero norm (unknown), no logits at all.
        edge = rec(
            rng, "edge", feature_norm=0.0, top_logits=[(0, -3.5), (9999, 1e-3), *[(c, 0.0) for c in range(1, 31)]]
        )
        bare = rec(rng, "bare", head=None)
        results = idx.upsert([*records, edge, bare])
        assert [r.error for r in results] == [None] * 42
        for r in [*records, edge, bare]:
            sent[r.id] = (r.feature_norm, [(c, float(np.float32(v))) for c, v in r.top_logits])
        assert sent["bare"] == (0.0, [])
        idx.snapshot()
        # After the snapshot: replaced (new signals), and replaced without any (an upsert replaces everything).
        late = [rec(rng, f"sig{i}", **signals(rng, 3)) for i in range(5)] + [rec(rng, "sig5")]
        idx.upsert(late)
        for r in late:
            sent[r.id] = (r.feature_norm, list(r.top_logits))
        assert sent["sig5"] == (0.0, [])

        def check(shard: ShardIndex) -> None:
            found, missing = shard.get(list(sent), include_vectors=True)
            assert missing == []
            assert {r.id: signal_of(r) for r in found} == sent
            # Without vectors, no signals either: they travel with the vectors.
            plain, _ = shard.get(["sig0"])
            assert signal_of(plain[0]) == (0.0, [])
            scanned = [r for page in scan_all(shard, 7) for r in page]
            assert {r.id: signal_of(r) for r in scanned} == sent

        check(idx)
        idx.close(final_snapshot=False)
        idx = ShardIndex(settings(tmp_path / "s"))
        assert (idx.load_report.mode, idx.load_report.replayed_changes) == ("snapshot", 6)
        check(idx)
        idx.close()
        idx = ShardIndex(settings(tmp_path / "s"))
        assert (idx.load_report.mode, idx.load_report.replayed_changes) == ("snapshot", 0)
        check(idx)
    finally:
        idx.close(final_snapshot=False)


def test_scan_pages_cover_every_record_exactly_once(shard: ShardIndex, rng: np.random.Generator) -> None:
    truth = Truth()
    fill(shard, truth, rng, 57)
    shard.delete(["img3", "img20", "img56"])
    # Replacements keep their place in the order; new ids come after the old ones.
    replaced = [rec(rng, "img10", metadata={"v": "2"}), rec(rng, "extra")]
    shard.upsert(replaced)
    stored = [f"img{i}" for i in range(57) if i not in (3, 20, 56)] + ["extra"]
    for size in (1, 7, 55, 100, 0, 1000):
        pages = scan_all(shard, size)
        per_page = size or 100
        assert [r.id for page in pages for r in page] == stored, size
        # Full pages up to the last, and no empty page after a full one (55 records fill exactly one page).
        assert [len(p) for p in pages] == [min(per_page, len(stored) - i) for i in range(0, len(stored), per_page)]
    (only,) = scan_all(shard, 1000)
    found, _ = shard.get(stored, include_vectors=True)
    for got, want in zip(only, found, strict=True):
        assert (got.id, got.metadata, got.source_name, got.semantic_head, got.created_ms) == (
            want.id,
            want.metadata,
            want.source_name,
            want.semantic_head,
            want.created_ms,
        )
        assert got.visual is not None and want.visual is not None
        assert got.semantic is not None and want.semantic is not None
        np.testing.assert_array_equal(got.visual, want.visual)
        np.testing.assert_array_equal(got.semantic, want.semantic)
    assert only[stored.index("img10")].metadata == {"v": "2"}
    assert shard.scan(5, "", "").next_page_token != ""


def test_scan_of_an_empty_shard_is_one_empty_page(shard: ShardIndex) -> None:
    page = shard.scan()
    assert (page.records, page.next_page_token) == ([], "")


def test_scan_skips_the_records_of_a_head(shard: ShardIndex, rng: np.random.Generator) -> None:
    # Interleaved, so that skipped records sit between the returned ones on every page.
    records = [rec(rng, f"r{i}", head=[HEAD, "proj@2", None][i % 3]) for i in range(30)]
    shard.upsert(records)
    heads = {r.id: r.semantic_head or None for r in records}
    for skip in (HEAD, "proj@2", "proj@9", ""):
        for size in (1, 4, 1000):
            got = [r.id for page in scan_all(shard, size, skip) for r in page]
            assert got == [r.id for r in records if not skip or heads[r.id] != skip], (skip, size)
    # The same skip resumes a re-projection: what was moved to the new head is not seen again.
    page = shard.scan(4, "", "proj@2")
    moved = [SemanticInput(r.id, rng.normal(size=SD).astype(np.float32), "proj@2") for r in page.records]
    assert all(r.changed for r in shard.set_semantic(moved))
    rest = [r.id for p in scan_all(shard, 4, "proj@2") for r in p]
    assert rest == [r.id for r in records if heads[r.id] != "proj@2" and r.id not in {m.id for m in moved}]
    assert len(rest) == 20 - 4


def test_scan_rejects_bad_page_sizes_and_tokens(tmp_path: Path, rng: np.random.Generator) -> None:
    idx = ShardIndex(settings(tmp_path / "s"))
    other = ShardIndex(settings(tmp_path / "other"))
    try:
        fill(idx, Truth(), rng, 10)
        fill(other, Truth(), rng, 10)
        with pytest.raises(InvalidArgument, match=r"^page_size must be between 1 and 1000, got 1001$"):
            idx.scan(1001)
        token = idx.scan(3).next_page_token
        label, mac = token.split(".")
        foreign = other.scan(3).next_page_token
        assert foreign.split(".")[0] == label  # same position, different shard
        bad = [
            "garbage",
            label,
            f"{label}.",
            f"{int(label) + 1}.{mac}",
            f"0{label}.{mac}",
            f"{token}x",
            f" {token}",
            "\u00b2." + mac,
            "9" * 40 + "." + mac,
            foreign,
        ]
        for t in bad:
            with pytest.raises(InvalidArgument, match="page_token was not issued by this shard"):
                idx.scan(3, t)
        assert [r.id for r in idx.scan(3, token).records] == ["img3", "img4", "img5"]
        # Tokens stay valid across a restart, so an interrupted re-projection can go on where it was.
        idx.close()
        idx = ShardIndex(settings(tmp_path / "s"))
        assert [r.id for r in idx.scan(100, token).records] == [f"img{i}" for i in range(3, 10)]
    finally:
        idx.close(final_snapshot=False)
        other.close(final_snapshot=False)


def test_set_semantic_adds_a_head_and_keeps_the_others(shard: ShardIndex, rng: np.random.Generator) -> None:
    truth = Truth()
    old = [rec(rng, f"old{i}", **signals(rng)) for i in range(40)]
    bare = [rec(rng, f"bare{i}", head=None) for i in range(6)]
    shard.upsert(old + bare)
    for r in old + bare:
        truth.put(r)
    before = {r.id: r for r in shard.get([r.id for r in old + bare], include_vectors=True)[0]}
    moving = [r.id for r in old[::3]] + ["bare0", "bare1"]
    updates = [SemanticInput(i, rng.normal(size=SD).astype(np.float32) * 7, "proj@2") for i in moving]
    results = shard.set_semantic(
        [*updates[:5], SemanticInput("ghost", np.ones(SD, np.float32), "proj@2"), *updates[5:]]
    )
    assert [(r.id, r.changed, r.error is None) for r in results] == [
        *[(u.id, True, True) for u in updates[:5]],
        ("ghost", False, False),
        *[(u.id, True, True) for u in updates[5:]],
    ]
    err = results[5].error
    assert err is not None
    assert err.code == grpc.StatusCode.NOT_FOUND
    assert err.message == "update 5 ('ghost'): no record with this id"
    assert shard.get(["ghost"])[1] == ["ghost"]
    for u in updates:
        assert u.semantic is not None
        truth.set_semantic(u.id, "proj@2", u.semantic)
    assert shard.stats().semantic_heads == {HEAD: 40, "proj@2": len(updates)}
    assert shard.stats().count == 46

    assert_matches(shard, truth, rng, Space.SEMANTIC, "proj@2", k=30)
    assert_matches(shard, truth, rng, Space.SEMANTIC, HEAD, k=50)
    assert_matches(shard, truth, rng, Space.VISUAL, k=50)
    # The old head's index still holds every old record: a new head's vector is added next to it.
    q = rng.normal(size=SD).astype(np.float32)
    got = shard.search(Space.SEMANTIC, q, 1000, semantic_head=HEAD)
    assert {h.id for h in got.hits} == {r.id for r in old}
    assert got.searched == 40
    for u in updates:
        assert u.semantic is not None
        (hit,) = shard.search(Space.SEMANTIC, u.semantic, 1, semantic_head="proj@2").hits
        assert hit.id == u.id
        assert hit.score == pytest.approx(1.0, abs=2e-3)

    after = {r.id: r for r in shard.get(list(before), include_vectors=True)[0]}
    for id_, was in before.items():
        now = after[id_]
        assert (now.label, now.metadata, now.source_name, now.created_ms) == (
            was.label,
            was.metadata,
            was.source_name,
            was.created_ms,
        )
        assert signal_of(now) == signal_of(was)
        assert now.visual is not None and was.visual is not None
        np.testing.assert_array_equal(now.visual, was.visual)
        assert now.heads == tuple(sorted(truth.semantic.get(id_, {})))
        for head, vec in truth.semantic.get(id_, {}).items():
            np.testing.assert_allclose(now.semantics[head], vec, atol=2e-3)
        if was.semantic is not None:
            np.testing.assert_array_equal(now.semantics[HEAD], was.semantic)
        # Without a head configuration, the legacy fields show the first head by name.
        assert now.semantic_head == (now.heads[0] if now.heads else None)

    # Writing the new head again replaces its vector, still keeping the old head's.
    again = SemanticInput("old0", rng.normal(size=SD).astype(np.float32), "proj@2")
    assert shard.set_semantic([again])[0].changed
    assert again.semantic is not None
    truth.set_semantic("old0", "proj@2", again.semantic)
    assert shard.stats().semantic_heads == {HEAD: 40, "proj@2": len(updates)}
    rest = [SemanticInput(r.id, rng.normal(size=SD).astype(np.float32), "proj@2") for r in old if r.id not in moving]
    assert all(r.changed for r in shard.set_semantic(rest))
    for u in rest:
        assert u.semantic is not None
        truth.set_semantic(u.id, "proj@2", u.semantic)
    assert shard.stats().semantic_heads == {HEAD: 40, "proj@2": 42}
    assert_matches(shard, truth, rng, Space.SEMANTIC, "proj@2", k=50)
    # Records with several heads are still whole records to later writes: a delete or an upsert drops them all.
    shard.delete(["old0", "bare0"])
    replaced = rec(rng, "old3", head=None)
    shard.upsert([replaced])
    for id_ in ("old0", "bare0", "old3"):
        truth.drop(id_)
    truth.put(replaced)
    assert shard.stats().visual_count == 44
    assert shard.stats().semantic_heads == {HEAD: 38, "proj@2": 39}
    assert_matches(shard, truth, rng, Space.VISUAL, k=50)
    assert_matches(shard, truth, rng, Space.SEMANTIC, HEAD, k=50)
    assert_matches(shard, truth, rng, Space.SEMANTIC, "proj@2", k=50)


BAD_UPDATES: list[tuple[dict[str, Any], str]] = [
    ({"id": ""}, "update 1: id must not be empty"),
    ({"id": "x" * 257}, "id has 257 characters, at most 256"),
    ({"semantic": None}, "has no semantic vector"),
    ({"semantic": np.ones(SD + 2, np.float32)}, f"semantic vector has {SD + 2} values, expected {SD}"),
    ({"semantic": np.full(SD, np.nan, np.float32)}, "semantic vector contains NaN or infinite values"),
    ({"semantic": np.zeros(SD, np.float32)}, "semantic vector is all zeros"),
    ({"semantic_head": ""}, "semantic_head is required"),
    ({"semantic_head": "h" * 257}, "semantic_head has 257 characters, at most 256"),
]


@pytest.mark.parametrize(("change", "message"), BAD_UPDATES, ids=[m for _, m in BAD_UPDATES])
def test_a_bad_semantic_update_fails_alone(
    shard: ShardIndex, rng: np.random.Generator, change: dict[str, Any], message: str
) -> None:
    shard.upsert([rec(rng, "a"), rec(rng, "b"), rec(rng, "c")])
    base = {"id": "b", "semantic": rng.normal(size=SD).astype(np.float32), "semantic_head": "proj@2"}
    good = [SemanticInput(i, rng.normal(size=SD).astype(np.float32), "proj@2") for i in ("a", "c")]
    results = shard.set_semantic([good[0], SemanticInput(**{**base, **change}), good[1]])
    assert [r.error is None for r in results] == [True, False, True]
    err = results[1].error
    assert err is not None
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT
    assert message in err.message
    assert err.message.startswith("update 1")
    assert [(r.id, r.heads) for r in shard.get(["a", "b", "c"])[0]] == [
        ("a", (HEAD, "proj@2")),
        ("b", (HEAD,)),
        ("c", (HEAD, "proj@2")),
    ]
    assert shard.stats().semantic_heads == {HEAD: 3, "proj@2": 2}


def test_set_semantic_batch_limit(tmp_path: Path, rng: np.random.Generator) -> None:
    idx = ShardIndex(settings(tmp_path / "s", max_batch=4))
    try:
        fill(idx, Truth(), rng, 4)
        too_many = [SemanticInput(f"img{i % 4}", rng.normal(size=SD).astype(np.float32), "proj@2") for i in range(5)]
        with pytest.raises(ResourceExhausted, match="5 updates in one request, at most 4 allowed"):
            idx.set_semantic(too_many)
        assert idx.stats().semantic_heads == {HEAD: 4}
        assert all(r.changed for r in idx.set_semantic(too_many[:4]))
        assert idx.stats().semantic_heads == {HEAD: 4, "proj@2": 4}
    finally:
        idx.close(final_snapshot=False)


def test_set_semantic_survives_reopen_snapshot_replay_and_rebuild(tmp_path: Path, rng: np.random.Generator) -> None:
    truth = Truth()
    idx = ShardIndex(settings(tmp_path / "s"))
    ids = fill(idx, truth, rng, 60)
    idx.snapshot()
    late = rec(rng, "late")
    idx.upsert([late])
    truth.put(late)
    # Twice for one id in one request: the second wins. Also an id upserted after the snapshot.
    moving = [*ids[:20], "late"]
    updates = [SemanticInput(i, rng.normal(size=SD).astype(np.float32), "proj@2") for i in moving]
    updates.append(SemanticInput("img0", rng.normal(size=SD).astype(np.float32), "proj@3"))
    assert all(r.changed for r in idx.set_semantic(updates))
    for u in updates:
        assert u.semantic is not None
        truth.set_semantic(u.id, u.semantic_head, u.semantic)
    heads = {HEAD: 61, "proj@2": 21, "proj@3": 1}
    assert idx.stats().semantic_heads == heads
    assert idx.stats().wal_entries == 1 + len(updates)
    qs = [(s, q) for s, q in queries(rng) if s is Space.VISUAL]
    before = answers(idx, qs)

    def check(shard: ShardIndex) -> None:
        assert shard.stats().semantic_heads == heads
        assert answers(shard, qs) == before
        for head in heads:
            assert_matches(shard, truth, rng, Space.SEMANTIC, head, k=70, queries=3)
        (img0,), _ = shard.get(["img0"], include_vectors=True)
        assert img0.heads == (HEAD, "proj@2", "proj@3")
        np.testing.assert_allclose(img0.semantics["proj@3"], truth.semantic["img0"]["proj@3"], atol=2e-3)

    idx.close(final_snapshot=False)
    idx = ShardIndex(settings(tmp_path / "s"))
    try:
        assert (idx.load_report.mode, idx.load_report.replayed_changes) == ("snapshot", 1 + len(updates))
        check(idx)
    finally:
        idx.close()
    idx = ShardIndex(settings(tmp_path / "s"))
    try:
        assert (idx.load_report.mode, idx.load_report.replayed_changes) == ("snapshot", 0)
        check(idx)
    finally:
        idx.close(final_snapshot=False)
    shutil.rmtree(tmp_path / "s" / snapshot.SNAPSHOT_DIR)
    idx = ShardIndex(settings(tmp_path / "s"))
    try:
        assert idx.load_report.mode == "rebuild"
        check(idx)
    finally:
        idx.close(final_snapshot=False)


# The schema as version 1 of store.py created it (git show 34aba55:services/index/imgsearch/index/store.py).
V1_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS records (
    label INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    has_visual INTEGER NOT NULL,
    semantic_head TEXT,
    metadata TEXT NOT NULL,
    source_name TEXT NOT NULL,
    created_ms INTEGER NOT NULL,
    updated_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS vectors (label INTEGER PRIMARY KEY, visual BLOB, semantic BLOB);
CREATE TABLE IF NOT EXISTS changes (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    op TEXT NOT NULL,
    label INTEGER NOT NULL,
    id TEXT NOT NULL,
    unix_ms INTEGER NOT NULL
);
"""


def v1_database(directory: Path, records: Sequence[RecordInput], version: str = "1") -> str:
    """A database as version 1 of the store wrote it (one upsert per record); returns its shard uuid."""
    directory.mkdir(parents=True)
    shard_uuid = uuid.uuid4().hex
    db = sqlite3.connect(directory / DB_NAME)
    with db:
        db.executescript(V1_SCHEMA)
        meta = {"schema_version": version, "shard_uuid": shard_uuid, "visual_dim": str(VD), "semantic_dim": str(SD)}
        db.executemany("INSERT INTO meta(key, value) VALUES (?, ?)", meta.items())
        for n, r in enumerate(records):
            ts = 1_700_000_000_000 + n
            (label,) = db.execute(
                "INSERT INTO records(id, has_visual, semantic_head, metadata, source_name, created_ms, updated_ms) "
                "VALUES (?, ?, ?, ?, ?, ?, ?) RETURNING label",
                (
                    r.id,
                    int(r.visual is not None),
                    r.semantic_head or None,
                    json.dumps(r.metadata),
                    r.source_name,
                    ts,
                    ts,
                ),
            ).fetchone()
            blobs = [
                None if v is None else (v / np.linalg.norm(v)).astype("<f4").tobytes() for v in (r.visual, r.semantic)
            ]
            db.execute("INSERT INTO vectors(label, visual, semantic) VALUES (?, ?, ?)", (label, *blobs))
            db.execute("INSERT INTO changes(op, label, id, unix_ms) VALUES ('upsert', ?, ?, ?)", (label, r.id, ts))
    db.close()
    return shard_uuid


def test_an_old_schema_database_is_upgraded_and_keeps_its_data(tmp_path: Path, rng: np.random.Generator) -> None:
    truth = Truth()
    records = [rec(rng, f"v1-{i}", head=HEAD if i % 4 else None) for i in range(30)]
    for r in records:
        truth.put(r)
    shard_uuid = v1_database(tmp_path / "s", records)
    idx = ShardIndex(settings(tmp_path / "s"))
    try:
        assert (idx.load_report.mode, idx.load_report.records) == ("rebuild", 30)
        assert idx.stats().semantic_heads == {HEAD: 22}
        assert_matches(idx, truth, rng, Space.VISUAL, k=40)
        assert_matches(idx, truth, rng, Space.SEMANTIC, HEAD, k=40)
        found, _ = idx.get([r.id for r in records], include_vectors=True)
        assert [(r.id, r.created_ms, r.source_name, signal_of(r)) for r in found] == [
            (r.id, 1_700_000_000_000 + n, r.source_name, (0.0, [])) for n, r in enumerate(records)
        ]
        assert sum(len(page) for page in scan_all(idx, 8)) == 30
        # Old records take the new writes: signals on upsert, semantic replacement.
        fresh = rec(rng, "v1-0", **signals(rng))
        idx.upsert([fresh])
        truth.put(fresh)
        assert all(r.changed for r in idx.set_semantic([SemanticInput("v1-1", np.ones(SD, np.float32), "proj@2")]))
        truth.set_semantic("v1-1", "proj@2", np.ones(SD, np.float32))
    finally:
        idx.close()
    db = sqlite3.connect(tmp_path / "s" / DB_NAME)
    meta = dict(db.execute("SELECT key, value FROM meta").fetchall())
    columns = [row[1] for row in db.execute("PRAGMA table_info(vectors)")]
    db.close()
    assert (meta["schema_version"], meta["shard_uuid"]) == ("4", shard_uuid)
    assert columns == ["label", "visual", "feature_norm", "top_logits"]
    idx = ShardIndex(settings(tmp_path / "s"))
    try:
        assert idx.load_report.mode == "snapshot"
        assert idx.stats().count == 30
        assert_matches(idx, truth, rng, Space.VISUAL, k=40)
        assert_matches(idx, truth, rng, Space.SEMANTIC, HEAD, k=40)
        assert_matches(idx, truth, rng, Space.SEMANTIC, "proj@2", k=5, queries=1)
        (v10,), _ = idx.get(["v1-0"], include_vectors=True)
        assert signal_of(v10) == (fresh.feature_norm, list(fresh.top_logits))
    finally:
        idx.close(final_snapshot=False)


def test_a_database_of_an_unknown_schema_version_is_refused_untouched(tmp_path: Path, rng: np.random.Generator) -> None:
    v1_database(tmp_path / "s", [rec(rng, "a")], version="9")
    with pytest.raises(FailedPrecondition, match="has schema version 9, this server reads 1, 2, 3"):
        ShardIndex(settings(tmp_path / "s"))
    db = sqlite3.connect(tmp_path / "s" / DB_NAME)
    columns = [row[1] for row in db.execute("PRAGMA table_info(vectors)")]
    db.close()
    assert columns == ["label", "visual", "semantic"]
    tables = {row[0] for row in sqlite3.connect(tmp_path / "s" / DB_NAME).execute("SELECT name FROM sqlite_master")}
    assert "semantics" not in tables
