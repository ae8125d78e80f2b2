"""Approximate indexes, float16 storage, filtered/thresholded/paged search: checked against exact FAISS Flat."""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import pytest
from prometheus_client import REGISTRY

from imgsearch.index import snapshot, state
from imgsearch.index.core import Cursor, RecordInput, SearchFilter, ShardIndex, Space
from imgsearch.index.indexes import INDEX_KINDS, as_kind, new_cpu_index
from imgsearch.index.settings import IndexSettings
from imgsearch.index.store import DB_NAME

VD, SD = 64, 32
HEAD = "proj@1"


def settings(path: Path, **overrides: Any) -> IndexSettings:
    base: dict[str, Any] = {
        "data_dir": path,
        "shard": "ann",
        "visual_dim": VD,
        "semantic_dim": SD,
        "snapshot_every": 10**9,
        "snapshot_interval_seconds": 3600.0,
        "use_gpu": False,
        "ann_min_vectors": 1000,
        "ann_merge_min": 500,
        "background_build": False,
        # Everything else (nprobe, PQ shape, re-rank depth, HNSW parameters) at the shipped defaults.
    }
    base.update(overrides)
    return IndexSettings(**base)


def clustered(rng: np.random.Generator, n: int, dim: int, clusters: int = 40) -> np.ndarray:
    """Unit vectors around random centres (embeddings have structure; uniform noise on the sphere has none)."""
    centres = rng.standard_normal((clusters, dim)).astype(np.float32)
    x = centres[rng.integers(0, clusters, n)] + 0.6 * rng.standard_normal((n, dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float32)


def fill(idx: ShardIndex, rng: np.random.Generator, n: int, start: int = 0) -> tuple[np.ndarray, np.ndarray]:
    vis, sem = clustered(rng, n, VD), clustered(rng, n, SD)
    for lo in range(0, n, 1000):
        idx.upsert(
            [
                RecordInput(
                    id=f"r{start + i}",
                    visual=vis[i],
                    semantics=[(HEAD, sem[i])],
                    metadata={"colour": ("red", "green", "blue")[i % 3], "rare": "yes" if i % 200 == 7 else "no"},
                )
                for i in range(lo, min(n, lo + 1000))
            ]
        )
    return vis, sem


def near(rng: np.random.Generator, vectors: np.ndarray, n: int) -> np.ndarray:
    """Queries like the data: stored vectors plus noise (queries from elsewhere have no meaningful neighbours)."""
    q = vectors[rng.integers(0, vectors.shape[0], n)] + 0.5 * rng.standard_normal((n, vectors.shape[1]))
    out: np.ndarray = (q / np.linalg.norm(q, axis=1, keepdims=True)).astype(np.float32)
    return out


def exact_top(vectors: np.ndarray, ids: list[str], q: np.ndarray, k: int) -> list[str]:
    flat = faiss.IndexFlatIP(vectors.shape[1])
    flat.add(vectors.astype(np.float16).astype(np.float32))
    _, found = flat.search(q[None, :], k)
    return [ids[i] for i in found[0] if i >= 0]


def recall(idx: ShardIndex, space: Space, vectors: np.ndarray, ids: list[str], queries: np.ndarray) -> float:
    hit = 0
    for q in queries:
        want = set(exact_top(vectors, ids, q, 10))
        got = {h.id for h in idx.search(space, q, 10).hits}
        hit += len(want & got)
    return hit / (10 * len(queries))


def page_through(
    idx: ShardIndex, space: Space, q: np.ndarray, size: int, where: SearchFilter
) -> list[tuple[float, str]]:
    """Every page of a cursor-paged search, as (-score, id) in the order served."""
    out: list[tuple[float, str]] = []
    after = None
    for _ in range(200):
        page = idx.search(space, q, size, where=where, after=after).hits
        if not page:
            break
        out += [(-h.score, h.id) for h in page]
        after = Cursor(score=page[-1].score, id=page[-1].id)
    return out


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(7)


@pytest.mark.parametrize("visual_kind", ["IVFPQFS", "IVFPQ"])
def test_ann_kinds_reach_recall_against_exact_flat(tmp_path: Path, rng: np.random.Generator, visual_kind: str) -> None:
    idx = ShardIndex(settings(tmp_path / "s", visual_index=visual_kind))
    try:
        vis, sem = fill(idx, rng, 3000)
        assert idx.stats().served_index_types == {"visual": "Flat", f"semantic:{HEAD}": "Flat"}
        assert idx.build_indexes() == 2
        assert idx.stats().served_index_types == {"visual": visual_kind, f"semantic:{HEAD}": "HNSW"}
        ids = [f"r{i}" for i in range(3000)]
        assert recall(idx, Space.SEMANTIC, sem, ids, near(rng, sem, 30)) >= 0.95
        assert recall(idx, Space.VISUAL, vis, ids, near(rng, vis, 30)) >= 0.95
        # New writes go to the exact tail and are found at once; deletes and replaces keep working.
        idx.upsert([RecordInput(id="new", visual=vis[0], semantics=[(HEAD, -sem[0])])])
        assert idx.search(Space.SEMANTIC, -sem[0], 1).hits[0].id == "new"
        idx.delete(["r5"])
        assert "r5" not in {h.id for h in idx.search(Space.SEMANTIC, sem[5], 10).hits}
        idx.upsert([RecordInput(id="r6", visual=vis[6], semantics=[(HEAD, -sem[6])])])
        assert idx.search(Space.SEMANTIC, -sem[6], 1).hits[0].id == "r6"
        assert "r6" not in {h.id for h in idx.search(Space.SEMANTIC, sem[6], 3).hits}
        assert idx.stats().count == 3000
    finally:
        idx.close(final_snapshot=False)


def test_a_tail_is_merged_once_writes_stop(tmp_path: Path, rng: np.random.Generator) -> None:
    # Below the merge thresholds a tail stays exact while writes come; once they stop for idle_merge_seconds
    # it is folded into the base, so searches no longer scan it, and what it held is still found.
    idx = ShardIndex(settings(tmp_path / "s", ann_idle_merge_seconds=0.3, ann_idle_merge_min=50))
    try:
        fill(idx, rng, 3000)
        idx.build_indexes()
        vis, sem = fill(idx, rng, 100, start=3000)
        tails = idx.stats().exact_tail
        assert len(tails) == 2 and all(100 <= t < 500 for t in tails.values()), tails
        assert idx.build_indexes() == 0  # written just now: not idle
        time.sleep(0.4)
        assert idx.build_indexes() == 2  # the visual and the semantic tail
        assert idx.stats().exact_tail == dict.fromkeys(tails, 0)
        assert idx.search(Space.VISUAL, vis[5], 1).hits[0].id == "r3005"
        assert idx.search(Space.SEMANTIC, sem[7], 1).hits[0].id == "r3007"
        # Smaller than idle_merge_min: stays exact however long the shard is idle.
        fill(idx, rng, 20, start=4000)
        time.sleep(0.4)
        assert idx.build_indexes() == 0
    finally:
        idx.close(final_snapshot=False)


def test_background_builds_wait_while_a_bulk_load_streams_in(
    tmp_path: Path, rng: np.random.Generator, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Writes at ann_bulk_write_rate or more: the builder's own passes leave the bases to wait (the load keeps the
    # CPU), until the load pauses or a tail reaches ann_bulk_tail_max; an explicit build_indexes() is not held.
    monkeypatch.setattr(state, "WRITE_RATE_WINDOW_S", 0.5)
    idx = ShardIndex(settings(tmp_path / "s", ann_bulk_write_rate=1000.0, ann_bulk_tail_max=2500))
    try:
        fill(idx, rng, 2000)  # well over 1000 records/s over the last half second
        assert idx._memory.write_rate() >= 1000
        assert idx._builder.run_once(background=True) == 0
        assert idx.stats().exact_tail == {"visual": 2000, f"semantic:{HEAD}": 2000}
        fill(idx, rng, 600, start=2000)  # still streaming, but the tails now pass ann_bulk_tail_max
        assert idx._builder.run_once(background=True) == 2
        fill(idx, rng, 1200, start=2600)  # a new load: tails below the cap wait again ...
        assert idx._builder.run_once(background=True) == 0
        time.sleep(0.6)  # ... until it pauses
        assert idx._memory.write_rate() == 0
        assert idx._builder.run_once(background=True) == 2
        assert idx.stats().exact_tail == {"visual": 0, f"semantic:{HEAD}": 0}
    finally:
        idx.close(final_snapshot=False)
    # Everyday writes (below the rate) are built as before, and 0 turns the wait off.
    for rate in (10**6, 0.0):
        quiet = ShardIndex(settings(tmp_path / f"q{rate}", ann_bulk_write_rate=rate))
        try:
            fill(quiet, rng, 1500)
            assert quiet._builder.run_once(background=True) == 2
        finally:
            quiet.close(final_snapshot=False)


def test_metrics_say_how_many_vectors_wait_for_the_approximate_index(tmp_path: Path, rng: np.random.Generator) -> None:
    # What an operator watches during a bulk load: the exact tails grow while writes outrun the builder, and
    # fall to zero as each build is swapped in; every build is timed by space and mode.
    def waiting(space: str) -> float | None:
        return REGISTRY.get_sample_value("imgsearch_index_unindexed_vectors", {"shard": "gauge", "space": space})

    def builds(space: str, mode: str) -> float:
        labels = {"shard": "gauge", "space": space, "mode": mode}
        return REGISTRY.get_sample_value("imgsearch_index_build_seconds_count", labels) or 0.0

    idx = ShardIndex(settings(tmp_path / "s", shard="gauge"))
    try:
        assert waiting("visual") == 0 and waiting("semantic") == 0
        fill(idx, rng, 1500)
        assert waiting("visual") == 1500 and waiting("semantic") == 1500
        before = builds("visual", "full"), builds("semantic", "full")
        assert idx.build_indexes() == 2
        assert waiting("visual") == 0 and waiting("semantic") == 0
        assert (builds("visual", "full"), builds("semantic", "full")) == (before[0] + 1, before[1] + 1)
        fill(idx, rng, 120, start=1500)
        assert waiting("visual") == 120 and waiting("semantic") == 120
    finally:
        idx.close(final_snapshot=False)
    # An exact-only shard has nothing waiting, however much it holds.
    flat = ShardIndex(settings(tmp_path / "f", shard="gauge", visual_index="Flat", semantic_index="Flat"))
    try:
        fill(flat, rng, 1500)
        assert waiting("visual") == 0 and waiting("semantic") == 0
    finally:
        flat.close(final_snapshot=False)


@pytest.mark.skipif(not hasattr(os, "getpriority"), reason="per-thread priorities are a Linux feature")
def test_the_builder_thread_runs_nicer_than_the_shard(tmp_path: Path) -> None:
    idx = ShardIndex(settings(tmp_path / "s", background_build=True, build_nice=7))
    try:
        deadline = time.monotonic() + 10
        while idx._builder.native_id is None and time.monotonic() < deadline:
            time.sleep(0.01)
        builder = idx._builder.native_id
        assert builder is not None
        own = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
        assert os.getpriority(os.PRIO_PROCESS, builder) == min(19, own + 7)
    finally:
        idx.close(final_snapshot=False)


def test_background_build_swaps_in_while_searches_keep_answering(tmp_path: Path, rng: np.random.Generator) -> None:
    idx = ShardIndex(settings(tmp_path / "s", background_build=True))
    errors: list[BaseException] = []
    answers = 0
    stop = threading.Event()
    # A search racing a delete may lose a hit whose record is deleted between the index search and the record
    # fetch (the shard reads records after releasing its lock): only 10 of 10 before the deletes start.
    deleting = threading.Event()
    _, sem = fill(idx, rng, 900)

    def searcher() -> None:
        nonlocal answers
        q = clustered(np.random.default_rng(1), 50, SD)
        while not stop.is_set():
            try:
                got = idx.search(Space.SEMANTIC, q[answers % 50], 10)
                assert len(got.hits) == 10 or deleting.is_set()
                answers += 1
            except BaseException as exc:
                errors.append(exc)
                return

    t = threading.Thread(target=searcher)
    t.start()
    try:
        fill(idx, rng, 2500, start=900)  # passes the threshold: the builder thread starts on its own
        deadline = time.monotonic() + 60
        while idx.stats().served_index_types.get(f"semantic:{HEAD}") != "HNSW" and time.monotonic() < deadline:
            time.sleep(0.05)
        assert idx.stats().served_index_types[f"semantic:{HEAD}"] == "HNSW"
        # Deletes while and after the swap: never returned.
        deleting.set()
        idx.delete([f"r{i}" for i in range(0, 900, 3)])
        got = {h.id for h in idx.search(Space.SEMANTIC, sem[3], 50).hits}
        assert not {f"r{i}" for i in range(0, 900, 3)} & got
    finally:
        stop.set()
        t.join()
        idx.close(final_snapshot=False)
    assert not errors
    assert answers > 0


@pytest.mark.parametrize("approximate", [False, True])
def test_filters_min_score_and_cursor_paging(tmp_path: Path, rng: np.random.Generator, approximate: bool) -> None:
    idx = ShardIndex(settings(tmp_path / "s", filter_brute_limit=100))
    try:
        vis, sem = fill(idx, rng, 3000)
        if approximate:
            idx.build_indexes()
            assert idx.stats().served_index_types[f"semantic:{HEAD}"] == "HNSW"
        q = clustered(rng, 1, SD)[0]
        # Equality: only matching records, still k of them.
        red = idx.search(Space.SEMANTIC, q, 20, where=SearchFilter(terms=[("colour", ["red"])]))
        assert len(red.hits) == 20 and all(h.metadata["colour"] == "red" for h in red.hits)
        # IN plus AND with a selective term (15 records): all 15 come back, best first, exactly ranked.
        rare = SearchFilter(terms=[("colour", ["red", "green", "blue"]), ("rare", ["yes"])])
        got = idx.search(Space.SEMANTIC, q, 20, where=rare)
        rare_ids = [f"r{i}" for i in range(3000) if i % 200 == 7]
        assert sorted(h.id for h in got.hits) == sorted(rare_ids)
        want = exact_top(sem[[int(i[1:]) for i in rare_ids]], rare_ids, q, 20)
        assert [h.id for h in got.hits] == want
        # Nothing matches: an empty answer, not an error.
        assert idx.search(Space.SEMANTIC, q, 5, where=SearchFilter(terms=[("colour", ["mauve"])])).hits == []
        assert idx.search(Space.VISUAL, vis[0], 5, where=SearchFilter(terms=[("nokey", ["x"])])).hits == []
        # Time range: everything was created now, so a range in the past matches nothing.
        assert idx.search(Space.SEMANTIC, q, 5, where=SearchFilter(created_before_ms=1000)).hits == []
        now = int(time.time() * 1000)
        assert len(idx.search(Space.SEMANTIC, q, 5, where=SearchFilter(created_after_ms=now - 600_000)).hits) == 5
        # min_score.
        top = idx.search(Space.SEMANTIC, q, 50).hits
        cut = top[20].score
        above = idx.search(Space.SEMANTIC, q, 50, min_score=cut).hits
        assert above and all(h.score >= cut for h in above) and len(above) <= 21
        # Cursor paging over the green records: no duplicates, no gaps, ordered by (score desc, id asc).
        green = SearchFilter(terms=[("colour", ["green"])])
        scores = page_through(idx, Space.SEMANTIC, q, 97, green)
        pages = [i for _, i in scores]
        assert len(pages) == len(set(pages))
        assert scores == sorted(scores)
        greens = {f"r{i}" for i in range(3000) if i % 3 == 1}
        if approximate:
            assert len(set(pages) & greens) >= 0.95 * len(greens) and set(pages) <= greens
        else:
            assert set(pages) == greens
    finally:
        idx.close(final_snapshot=False)


@pytest.mark.parametrize("visual_kind", ["IVFPQFS", "IVFPQ"])
def test_visual_ivf_bases_filter_and_page_exactly_ranked(
    tmp_path: Path, rng: np.random.Generator, visual_kind: str
) -> None:
    idx = ShardIndex(settings(tmp_path / "s", visual_index=visual_kind, filter_brute_limit=100))
    try:
        vis, _ = fill(idx, rng, 3000)
        idx.build_indexes()
        assert idx.stats().served_index_types["visual"] == visual_kind
        q = near(rng, vis, 1)[0]
        # Selective (15 records, under the brute limit): every one is scored, then re-ranked from stored vectors.
        rare_ids = [f"r{i}" for i in range(3000) if i % 200 == 7]
        got = idx.search(Space.VISUAL, q, 20, where=SearchFilter(terms=[("rare", ["yes"])])).hits
        assert [h.id for h in got] == exact_top(vis[[int(i[1:]) for i in rare_ids]], rare_ids, q, 20)
        # Broad (1000 records, over it): the approximate search with a selector, still k hits, all matching.
        green_ids = [f"r{i}" for i in range(3000) if i % 3 == 1]
        green = SearchFilter(terms=[("colour", ["green"])])
        top = idx.search(Space.VISUAL, q, 10, where=green).hits
        assert len(top) == 10 and all(h.metadata["colour"] == "green" for h in top)
        want = exact_top(vis[[int(i[1:]) for i in green_ids]], green_ids, q, 10)
        assert len({h.id for h in top} & set(want)) >= 9
        # Cursor pages score every allowed row: all 1000 greens, once each, in order.
        pages = page_through(idx, Space.VISUAL, q, 211, green)
        assert sorted(i for _, i in pages) == sorted(green_ids), len(set(green_ids) - {i for _, i in pages})
        assert pages == sorted(pages)
        # A deleted record never comes back, on either path.
        idx.delete([rare_ids[0], top[0].id])
        assert rare_ids[0] not in {
            h.id for h in idx.search(Space.VISUAL, q, 20, where=SearchFilter(terms=[("rare", ["yes"])])).hits
        }
        assert top[0].id not in {h.id for h in idx.search(Space.VISUAL, q, 10, where=green).hits}
    finally:
        idx.close(final_snapshot=False)


@pytest.mark.parametrize("visual_kind", ["IVFPQFS", "IVFPQ"])
def test_restart_keeps_the_ann_base_and_links_it_into_later_snapshots(
    tmp_path: Path, rng: np.random.Generator, visual_kind: str
) -> None:
    idx = ShardIndex(settings(tmp_path / "s", visual_index=visual_kind))
    vis, sem = fill(idx, rng, 3000)
    idx.build_indexes()
    assert idx.snapshot() is True
    first = snapshot.newest(tmp_path / "s")
    assert first is not None
    inode = (first / "semantic-0.base.faiss").stat().st_ino
    idx.delete(["r1"])
    idx.upsert([RecordInput(id="r2", visual=vis[2], semantics=[(HEAD, -sem[2])])])
    assert idx.snapshot() is True
    second = snapshot.newest(tmp_path / "s")
    assert second is not None and second != first
    assert (second / "semantic-0.base.faiss").stat().st_ino == inode  # linked, not written again
    idx.upsert([RecordInput(id="after", visual=vis[3], semantics=[(HEAD, -sem[3])])])
    idx.close(final_snapshot=False)  # what a crash leaves: one change after the snapshot
    idx = ShardIndex(settings(tmp_path / "s", visual_index=visual_kind))
    try:
        assert (idx.load_report.mode, idx.load_report.replayed_changes) == ("snapshot", 1)
        assert idx.stats().served_index_types == {"visual": visual_kind, f"semantic:{HEAD}": "HNSW"}
        assert idx.stats().count == 3000
        assert "r1" not in {h.id for h in idx.search(Space.SEMANTIC, sem[1], 5).hits}
        assert idx.search(Space.SEMANTIC, -sem[2], 1).hits[0].id == "r2"
        assert idx.search(Space.SEMANTIC, -sem[3], 1).hits[0].id == "after"
        # The visual base read back from the snapshot answers, unfiltered and filtered (IVF-PQ reconstructs codes
        # from it; fast-scan scans them, since reconstructing from a read-back one crashes faiss 1.15.1).
        assert idx.search(Space.VISUAL, vis[10], 1).hits[0].id == "r10"
        rare = SearchFilter(terms=[("rare", ["yes"])])
        assert {h.id for h in idx.search(Space.VISUAL, vis[7], 5, where=rare).hits} >= {"r7"}
    finally:
        idx.close(final_snapshot=False)


def test_a_snapshot_made_under_another_visual_kind_still_serves_until_its_replacement_is_built(
    tmp_path: Path, rng: np.random.Generator
) -> None:
    # The upgrade to the fast-scan default: the old IVF-PQ base keeps serving from the snapshot (no rebuild from
    # SQLite, the semantic HNSW kept as it is), and the builder replaces it in the background.
    idx = ShardIndex(settings(tmp_path / "s", visual_index="IVFPQ"))
    vis, sem = fill(idx, rng, 3000)
    idx.build_indexes()
    idx.close()
    idx = ShardIndex(settings(tmp_path / "s", visual_index="IVFPQFS"))
    try:
        assert idx.load_report.mode == "snapshot"
        assert idx.stats().served_index_types == {"visual": "IVFPQ", f"semantic:{HEAD}": "HNSW"}
        assert idx.search(Space.VISUAL, vis[10], 1).hits[0].id == "r10"
        assert idx.build_indexes() == 1  # the visual base only
        assert idx.stats().served_index_types == {"visual": "IVFPQFS", f"semantic:{HEAD}": "HNSW"}
        ids = [f"r{i}" for i in range(3000)]
        assert recall(idx, Space.VISUAL, vis, ids, near(rng, vis, 30)) >= 0.95
        assert idx.search(Space.SEMANTIC, sem[11], 1).hits[0].id == "r11"
    finally:
        idx.close(final_snapshot=False)
    # A space now configured exact cannot use an approximate base: that snapshot is rebuilt from SQLite.
    idx = ShardIndex(settings(tmp_path / "s", visual_index="Flat"))
    try:
        assert idx.load_report.mode == "rebuild"
        assert idx.stats().served_index_types["visual"] == "Flat"
        assert idx.search(Space.VISUAL, vis[12], 1).hits[0].id == "r12"
    finally:
        idx.close(final_snapshot=False)


def test_a_version_3_float32_database_is_migrated_to_float16(tmp_path: Path, rng: np.random.Generator) -> None:
    idx = ShardIndex(settings(tmp_path / "s"))
    vis, sem = fill(idx, rng, 50)
    idx.close(final_snapshot=False)
    # Turn it back into what version 3 wrote: float32 blobs, no meta_terms rows.
    db = sqlite3.connect(tmp_path / "s" / DB_NAME)
    for table, column, key in (("vectors", "visual", "label"), ("semantics", "vector", "rowid")):
        rows = db.execute(f"SELECT {key}, {column} FROM {table}").fetchall()
        db.executemany(
            f"UPDATE {table} SET {column} = ? WHERE {key} = ?",
            [(np.frombuffer(b, "<f2").astype("<f4").tobytes(), k) for k, b in rows],
        )
    db.execute("DELETE FROM meta_terms")
    db.execute("UPDATE meta SET value = '3' WHERE key = 'schema_version'")
    db.commit()
    db.close()
    idx = ShardIndex(settings(tmp_path / "s"))
    try:
        assert idx.load_report.mode == "rebuild"
        (r7,), _ = idx.get(["r7"], include_vectors=True)
        assert r7.visual is not None
        np.testing.assert_array_equal(r7.visual, vis[7].astype(np.float16).astype(np.float32))
        assert idx.search(Space.SEMANTIC, sem[7], 1).hits[0].id == "r7"
        got = idx.search(Space.SEMANTIC, sem[7], 50, where=SearchFilter(terms=[("rare", ["yes"])]))
        assert [h.id for h in got.hits] == ["r7"]
    finally:
        idx.close(final_snapshot=False)
    db = sqlite3.connect(tmp_path / "s" / DB_NAME)
    (version,) = db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    (size,) = db.execute("SELECT length(visual) FROM vectors LIMIT 1").fetchone()
    db.close()
    assert (version, size) == ("4", 2 * VD)


def test_bad_filters_are_invalid_argument(tmp_path: Path, rng: np.random.Generator) -> None:
    from imgsearch.kit.errors import InvalidArgument

    idx = ShardIndex(settings(tmp_path / "s"))
    try:
        fill(idx, rng, 10)
        q = clustered(rng, 1, SD)[0]
        for bad in (
            SearchFilter(terms=[("", ["x"])]),
            SearchFilter(terms=[("colour", [])]),
            SearchFilter(created_after_ms=5, created_before_ms=5),
        ):
            with pytest.raises(InvalidArgument):
                idx.search(Space.SEMANTIC, q, 5, where=bad)
    finally:
        idx.close(final_snapshot=False)


def test_a_build_after_the_last_write_is_snapshotted_so_a_restart_does_not_rebuild(
    tmp_path: Path, rng: np.random.Generator
) -> None:
    # A bulk load snapshots its records, then the background build finishes with no write after it: the
    # snapshot on stop must still capture the new bases, or the restart serves exact search while rebuilding.
    idx = ShardIndex(settings(tmp_path / "s"))
    fill(idx, rng, 3000)
    assert idx.snapshot() is True
    assert idx.stats().served_index_types == {"visual": "Flat", f"semantic:{HEAD}": "Flat"}
    idx.build_indexes()
    idx.close()
    idx = ShardIndex(settings(tmp_path / "s"))
    try:
        assert (idx.load_report.mode, idx.load_report.replayed_changes) == ("snapshot", 0)
        assert idx.stats().served_index_types == {"visual": "IVFPQFS", f"semantic:{HEAD}": "HNSW"}
    finally:
        idx.close(final_snapshot=False)


@pytest.mark.parametrize(("source", "target"), [("Flat", "SQfp16"), ("SQfp16", "Flat"), ("SQfp16", "SQfp16")])
def test_an_exact_index_converts_to_another_exact_kind(rng: np.random.Generator, source: str, target: str) -> None:
    # A snapshot's tail written under one exact kind, loaded under another: same labels, same float16 vectors.
    vectors = clustered(rng, 300, VD).astype(np.float16).astype(np.float32)
    labels = rng.permutation(1000)[:300].astype(np.int64)
    index = new_cpu_index(INDEX_KINDS[source], VD)
    index.add_with_ids(vectors, labels)
    index.remove_ids(labels[:10].copy())
    out = as_kind(index, INDEX_KINDS[target], VD)
    assert isinstance(faiss.downcast_index(out.index), INDEX_KINDS[target].inner)
    assert (out is index) == (source == target)
    assert sorted(faiss.vector_to_array(out.id_map).tolist()) == sorted(labels[10:].tolist())
    for label, vector in zip(labels[10:50], vectors[10:50], strict=True):
        np.testing.assert_array_equal(out.reconstruct(int(label)), vector)
    assert as_kind(new_cpu_index(INDEX_KINDS[source], VD), INDEX_KINDS[target], VD).ntotal == 0
