"""Index shard benchmark: exact search latency and throughput, upsert throughput, restart with and without snapshot.

Runs the ShardIndex core in-process (no gRPC) on random L2-normalised vectors (1280-d visual, 384-d semantic),
with the production durability settings (SQLite WAL, synchronous=FULL). Prints a markdown table.

    python benchmarks/bench_index.py                 # 10k and 100k vectors, about 2 minutes on 2 cores
    python benchmarks/bench_index.py --sizes 10000   # quick run
    python benchmarks/bench_index.py --index-types Flat SQfp16   # the exact kinds side by side, alternating

Every space is exact here (VISUAL_INDEX and SEMANTIC_INDEX Flat): what small shards and every exact tail cost.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np

from imgsearch.index.core import RecordInput, ShardIndex, Space
from imgsearch.index.settings import IndexSettings

VD, SD = 1280, 384
HEAD = "bench@1"


def unit_rows(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    x = rng.standard_normal((n, dim), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def settings(path: Path, search_threads: int = 1, index_type: str | None = None) -> IndexSettings:
    # Snapshots only where the benchmark asks for them; exact spaces only, of the exact kind asked for.
    return IndexSettings(
        data_dir=path,
        shard="bench",
        visual_index="Flat",
        semantic_index="Flat",
        index_type=index_type or IndexSettings.model_fields["index_type"].default,
        snapshot_every=10**9,
        snapshot_interval_seconds=1e9,
        use_gpu=False,
        search_threads=search_threads,
    )


@dataclass
class Row:
    size: int
    index_type: str
    snapshot_mib: float
    upsert_per_s: float
    search_p50_ms: float
    search_p95_ms: float
    search_qps_1: float
    search_qps_2: float
    omp_all_p50_ms: float
    omp_all_qps_2: float
    semantic_p50_ms: float
    recall_at_10: float
    delete_p50_ms: float
    snapshot_write_s: float
    restart_snapshot_s: float
    restart_replay_s: float
    replayed: int
    restart_rebuild_s: float


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def fill(idx: ShardIndex, visual: np.ndarray, semantic: np.ndarray, batch: int) -> float:
    """Upsert everything in batches; returns records per second."""
    t0 = time.perf_counter()
    for start in range(0, visual.shape[0], batch):
        records = [
            RecordInput(
                id=f"img-{i:08d}",
                visual=visual[i],
                semantic=semantic[i],
                semantic_head=HEAD,
                metadata={"source": "bench", "n": str(i)},
                source_name=f"/bench/{i}.jpg",
            )
            for i in range(start, min(start + batch, visual.shape[0]))
        ]
        results = idx.upsert(records)
        assert all(r.error is None for r in results)
    return visual.shape[0] / (time.perf_counter() - t0)


def search_latencies(idx: ShardIndex, space: Space, queries: np.ndarray, k: int) -> list[float]:
    out = []
    for q in queries:
        t0 = time.perf_counter()
        idx.search(space, q, k)
        out.append(time.perf_counter() - t0)
    return out


def throughput(idx: ShardIndex, queries: np.ndarray, k: int, threads: int) -> float:
    """Queries per second with `threads` callers searching at once (as concurrent RPCs would)."""
    parts = np.array_split(queries, threads)
    start = threading.Barrier(threads + 1)

    def worker(qs: np.ndarray) -> None:
        start.wait()
        for q in qs:
            idx.search(Space.VISUAL, q, k)

    pool = [threading.Thread(target=worker, args=(p,)) for p in parts]
    for t in pool:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in pool:
        t.join()
    return len(queries) / (time.perf_counter() - t0)


def recall(idx: ShardIndex, visual: np.ndarray, queries: np.ndarray, k: int) -> float:
    """Fraction of the exact (numpy) top-k that the index returns: 1.0 for an exact index."""
    found = 0
    for q in queries:
        truth = {f"img-{i:08d}" for i in np.argsort(-(visual @ q))[:k]}
        found += len(truth & {h.id for h in idx.search(Space.VISUAL, q, k).hits})
    return found / (k * len(queries))


def reopen(path: Path, search_threads: int = 1, index_type: str | None = None) -> tuple[ShardIndex, float]:
    t0 = time.perf_counter()
    idx = ShardIndex(settings(path, search_threads, index_type))
    return idx, time.perf_counter() - t0


def bench_size(root: Path, n: int, n_queries: int, k: int, seed: int, index_type: str | None) -> Row:
    rng = np.random.default_rng(seed)
    visual = unit_rows(rng, n, VD)
    semantic = unit_rows(rng, n, SD)
    queries = unit_rows(rng, n_queries, VD)
    path = root / f"shard-{n}-{index_type}"
    idx = ShardIndex(settings(path, index_type=index_type))
    upsert_rate = fill(idx, visual, semantic, batch=1000)
    kind = idx.stats().index_type

    search_latencies(idx, Space.VISUAL, queries[:10], k)  # warm-up
    lat = search_latencies(idx, Space.VISUAL, queries, k)
    sem = search_latencies(idx, Space.SEMANTIC, unit_rows(rng, n_queries // 2, SD), k)
    qps1 = throughput(idx, queries, k, 1)
    qps2 = throughput(idx, queries, k, 2)
    rec = recall(idx, visual, queries[:20], k)

    deletes = []
    for i in range(20):
        t0 = time.perf_counter()
        idx.delete([f"img-{i:08d}"])
        deletes.append(time.perf_counter() - t0)

    t0 = time.perf_counter()
    idx.snapshot()
    snap_write = time.perf_counter() - t0
    # The snapshot is the exact indexes as they sit in memory (faiss write_index), so its size is theirs.
    snapshot_mib = sum(f.stat().st_size for f in (path / "snapshots").rglob("*") if f.is_file()) / 2**20
    idx.close(final_snapshot=False)
    idx, t_snapshot = reopen(path, index_type=index_type)
    assert idx.load_report.mode == "snapshot", idx.load_report
    idx.close(final_snapshot=False)
    # The same searches with OpenMP on every core inside each search (search_threads=0).
    idx, _ = reopen(path, search_threads=0, index_type=index_type)
    search_latencies(idx, Space.VISUAL, queries[:10], k)
    omp_lat = search_latencies(idx, Space.VISUAL, queries, k)
    omp_qps2 = throughput(idx, queries, k, 2)

    # 1000 changes after the snapshot, then a crash: the restart replays them.
    fill(idx, unit_rows(rng, 1000, VD), unit_rows(rng, 1000, SD), batch=1000)
    idx.close(final_snapshot=False)
    idx, t_replay = reopen(path, index_type=index_type)
    assert idx.load_report.mode == "snapshot", idx.load_report
    replayed = idx.load_report.replayed_changes
    idx.close(final_snapshot=False)

    shutil.rmtree(path / "snapshots")
    idx, t_rebuild = reopen(path, index_type=index_type)
    assert idx.load_report.mode == "rebuild", idx.load_report
    idx.close(final_snapshot=False)
    shutil.rmtree(path)
    return Row(
        size=n,
        index_type=kind,
        snapshot_mib=snapshot_mib,
        upsert_per_s=upsert_rate,
        search_p50_ms=percentile(lat, 50) * 1000,
        search_p95_ms=percentile(lat, 95) * 1000,
        search_qps_1=qps1,
        search_qps_2=qps2,
        omp_all_p50_ms=percentile(omp_lat, 50) * 1000,
        omp_all_qps_2=omp_qps2,
        semantic_p50_ms=percentile(sem, 50) * 1000,
        recall_at_10=rec,
        delete_p50_ms=statistics.median(deletes) * 1000,
        snapshot_write_s=snap_write,
        restart_snapshot_s=t_snapshot,
        restart_replay_s=t_replay,
        replayed=replayed,
        restart_rebuild_s=t_rebuild,
    )


def table(rows: list[Row]) -> str:
    head = [
        "vectors",
        "exact kind",
        "index MiB (its snapshot)",
        "upsert rec/s (batch 1000)",
        "visual search p50 / p95 ms (k=10)",
        "QPS, 1 caller",
        "QPS, 2 callers",
        "search_threads=0: p50 ms / QPS 2 callers",
        "semantic p50 ms",
        "recall@10 vs numpy",
        "delete 1 id p50 ms",
        "snapshot write s",
        "restart: snapshot s",
        "restart: snapshot + replay s",
        "restart: full rebuild s",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [
            f"{r.size:,}",
            r.index_type,
            f"{r.snapshot_mib:,.1f}",
            f"{r.upsert_per_s:,.0f}",
            f"{r.search_p50_ms:.2f} / {r.search_p95_ms:.2f}",
            f"{r.search_qps_1:,.0f}",
            f"{r.search_qps_2:,.0f}",
            f"{r.omp_all_p50_ms:.2f} / {r.omp_all_qps_2:,.0f}",
            f"{r.semantic_p50_ms:.2f}",
            f"{r.recall_at_10:.3f}",
            f"{r.delete_p50_ms:.1f}",
            f"{r.snapshot_write_s:.2f}",
            f"{r.restart_snapshot_s:.2f}",
            f"{r.restart_replay_s:.2f} ({r.replayed} changes)",
            f"{r.restart_rebuild_s:.2f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dir", type=Path, default=None, help="where to put the shards (default: a temp dir)")
    parser.add_argument(
        "--index-types", nargs="+", default=[None], help="exact kinds (INDEX_TYPE) to compare; default: the setting's"
    )
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench-index-", dir=args.dir))
    try:
        rows = [
            bench_size(root, n, args.queries, args.k, args.seed, kind) for n in args.sizes for kind in args.index_types
        ]
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(
        f"FAISS {faiss.__version__}, exact spaces (inner product), CPU, {os.cpu_count()} cores, "
        f"{args.queries} queries per size\n"
    )
    print(table(rows))


if __name__ == "__main__":
    main()
