"""Recall@10 and single-query CPU cost of one 500k-row shard of the 1M-image, 2-shard scale set, by search setting.

What it measures: shard 0 of the synthetic set that `python benchmarks/bench_scale.py scale --sizes 1000000
--no-real` serves from 2 shards, indexed as the product indexes it (semantic: HNSW over float16 via `build_base`
with the `AnnParams` defaults, M 32 / efConstruction 128; visual: the --kind (fast-scan IVFPQFS, the default, or
IVFPQ) made by `new_base_index` at --train-rows,
the retraining point the 1M run hit, then the other rows added, with the exact float16 re-rank the shard does),
searched one query at a time on one thread. Per setting (semantic: efSearch; visual: nprobe x re-rank depth;
`--filtered N...` adds the CPU of a search that scores every one of N allowed rows, as filters and cursor pages do):

- recall@10 shard: overlap of the shard's top 10 with the exact top 10 over the shard's own rows;
- est. 2-shard recall@10 [95 % bootstrap CI]: of the GLOBAL exact top-10 rows (over all 1M) that live in shard 0,
  the share shard 0 returns. The other shard is the same kind of sample, and a returned row's score is exact, so
  it survives the gateway's merge: this estimates what a 2-shard search returns of the true top 10;
- in/out: recall@10 shard for queries whose source row is in this shard / in the other one;
- mean CPU ms per query (time.process_time, one BLAS and one FAISS thread); visual also splits PQ search and
  re-rank, and gives the PQ-only recall (the candidates' first 10 before the re-rank).

Data: bench_scale.dataset() for n = 1M replayed in chunks into memory-mapped files (rng default_rng(n), visual
then semantic, the same draws in the same order: `check` proves it bit for bit), shard 0 = rows 0::2 rounded to
float16 as a shard stores them. Query sets: `extra` (default) = N stored vectors plus the scale run's noise,
drawn from a separate stream default_rng(20000 + dim) so the base is untouched; `scale` = the queries drawn from
the dataset's own stream exactly where the scale run draws them (`--queries 200` gives the 1M run's very
queries). Exact references: IndexFlatIP per 100k-row chunk, merged. Shard rows, queries, truths and built
indexes (about 4 GB; 8 GB at the peak of prep, while the 1M float32 visual base exists) are cached under --work,
so reruns reuse them. Visual timing takes each query's PQ search, then its re-rank, as a shard does.

Reproduce the published sweep (2000 extra queries; timed on the 2-vCPU dev VM, under nice -n 19 beside other
jobs; stage times from that run):

    python benchmarks/bench_recall.py check      # generator == bench_scale.dataset (seconds)
    python benchmarks/bench_recall.py prep       # 1M sets, shard 0, 2000 queries, exact truths (~4 min)
    python benchmarks/bench_recall.py semantic --ef 256 288 320 352 384 448 512
        # HNSW build ~13 min once (cached), then ~35 s
    python benchmarks/bench_recall.py visual --train-rows 380000 --nprobe 32 64 96 128 160 192 --depths 100 300
        # IVF-PQ train + add ~80 s once (cached), then ~4 min

(`all` runs prep, semantic and visual with these defaults.) `--query-set scale --queries 300` on each stage gives
the first 300-query sweep, `visual --train-rows 500000 --depths 300` the IVF-PQ trained on the whole shard.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

# Single-threaded timing: set before numpy and FAISS load their BLAS (the thread count is read at load time).
os.environ["OPENBLAS_NUM_THREADS"] = "1"
os.environ["OMP_NUM_THREADS"] = "1"

import faiss
import numpy as np

from imgsearch.index.ann import IVF_KINDS, AnnParams, Base, SegmentedSpace, build_base, new_base_index
from imgsearch.index.indexes import INDEX_KINDS

if TYPE_CHECKING:  # mypy sees benchmarks/ as a package; run as a script, this file's directory is on sys.path
    from benchmarks.bench_scale import SD, VD, dataset, recall_at, rerank, unit
else:
    from bench_scale import SD, VD, dataset, recall_at, rerank, unit

N_ALL = 1_000_000
# bench_scale's default --queries: the 1M run drew this many queries per space, which moves the rng the semantic
# base is drawn from, so the replay advances it by exactly this much whatever query set is measured here.
SCALE_NQ = 200
K = 10
SPACES = (("visual", VD), ("semantic", SD))
CHUNK = 50_000  # bench_scale.clustered's chunk: the draws come in this order
EXACT_CHUNK = 100_000


def log(*parts: object) -> None:
    print(time.strftime("%H:%M:%S"), *parts, flush=True)


# --- data: bench_scale.dataset(rng, n, dim, None, nq) replayed in chunks, the same draws in the same order ---


def replay_base(rng: np.random.Generator, n: int, dim: int, out: np.ndarray | None) -> None:
    """bench_scale.clustered(rng, n, dim, max(64, n // 250), 0.7), written chunk by chunk into `out`.

    With out=None the draws are only made, which moves the rng on to the next space's part of the stream."""
    clusters = max(64, n // 250)
    centres = rng.standard_normal((clusters, dim), dtype=np.float32)
    for lo in range(0, n, CHUNK):
        hi = min(n, lo + CHUNK)
        pick = rng.integers(0, clusters, hi - lo)
        noise = rng.standard_normal((hi - lo, dim), dtype=np.float32)
        if out is not None:
            out[lo:hi] = unit(centres[pick] + 0.7 * noise)


def scale_queries(
    rng: np.random.Generator, base: np.ndarray | None, n: int, dim: int, nq: int
) -> tuple[np.ndarray, np.ndarray] | None:
    """dataset()'s synthetic queries (stored float32 rows plus noise) and their source rows; base=None: draws only."""
    idx = rng.integers(0, n, nq)
    noise = rng.standard_normal((nq, dim), dtype=np.float32)
    if base is None:
        return None
    return unit(base[idx] + 0.35 * noise / np.sqrt(dim / 64)), idx


def extra_queries(base: np.ndarray, nq: int) -> tuple[np.ndarray, np.ndarray]:
    """Queries made like dataset()'s from a separate stream: more of them without touching the base's draws."""
    n, dim = base.shape
    qr = np.random.default_rng(20_000 + dim)
    idx = np.sort(qr.integers(0, n, nq))
    return unit(base[idx] + 0.35 * qr.standard_normal((nq, dim), dtype=np.float32) / np.sqrt(dim / 64)), idx


def write_shard(full: np.ndarray, path: Path) -> None:
    """Shard 0's rows (global rows 0::2), float16-rounded as the shard stores them, as float32 (memory-mapped)."""
    n, dim = full.shape
    tmp = path.with_suffix(".partial.npy")
    shard = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=((n + 1) // 2, dim))
    for lo in range(0, n, 2 * EXACT_CHUNK):
        hi = min(n, lo + 2 * EXACT_CHUNK)
        shard[lo // 2 : (hi + 1) // 2] = full[lo:hi:2].astype(np.float16).astype(np.float32)
    shard.flush()
    del shard
    os.replace(tmp, path)


def save(path: Path, array: np.ndarray) -> None:
    """np.save through a temporary name, so that an interrupted run leaves nothing that looks cached."""
    tmp = path.with_suffix(".partial.npy")
    np.save(tmp, array)
    os.replace(tmp, path)


def exact_topk(base: np.ndarray, queries: np.ndarray, k: int, round16: bool) -> np.ndarray:
    """Exact inner-product top-k over a memory-mapped base: IndexFlatIP per 100k-row chunk, merged.

    round16: score the float16-rounded rows (what a shard stores) of a float32 base."""
    all_d, all_i = [], []
    for lo in range(0, base.shape[0], EXACT_CHUNK):
        hi = min(base.shape[0], lo + EXACT_CHUNK)
        flat = faiss.IndexFlatIP(base.shape[1])
        chunk = np.ascontiguousarray(base[lo:hi])
        flat.add(chunk.astype(np.float16).astype(np.float32) if round16 else chunk)
        d, i = flat.search(queries, k)
        all_d.append(d)
        all_i.append(i + lo)
        del flat
    d, i = np.concatenate(all_d, 1), np.concatenate(all_i, 1)
    order = np.argsort(-d, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(i, order, 1)


# --- the cached data set of one space ---


def data_dir(args: argparse.Namespace) -> Path:
    d = Path(args.work) / f"n{args.n}"
    d.mkdir(parents=True, exist_ok=True)
    return d


def set_name(args: argparse.Namespace) -> str:
    return f"{args.query_set}{args.queries}"


@dataclass
class SpaceData:
    base: np.ndarray  # shard 0's rows, float16-rounded, memory-mapped
    queries: np.ndarray
    source: np.ndarray  # each query's source row in the 1M set (even: it lives in shard 0)
    truth_shard: np.ndarray  # exact top 10 over shard 0's rows (shard row numbers)
    truth_all: np.ndarray  # exact top 10 over all n rows (global row numbers; shard 0 row = global // 2)


def space_files(args: argparse.Namespace, space: str) -> dict[str, Path]:
    d, s = data_dir(args), set_name(args)
    names = {"queries": f"{space}_{s}_queries", "source": f"{space}_{s}_source"}
    names |= {"truth_shard": f"{space}_{s}_truth_shard", "truth_all": f"{space}_{s}_truth_all"}
    files = {key: d / f"{name}.npy" for key, name in names.items()}
    files["base"] = d / f"{space}_shard0.npy"
    return files


def load_space(args: argparse.Namespace, space: str) -> SpaceData:
    f = space_files(args, space)
    return SpaceData(
        base=np.load(f["base"], mmap_mode="r"),
        queries=np.load(f["queries"]),
        source=np.load(f["source"]),
        truth_shard=np.load(f["truth_shard"]),
        truth_all=np.load(f["truth_all"]),
    )


def prep(args: argparse.Namespace) -> None:
    """The 1M sets as the scale run makes them, shard 0's rows, the queries and both exact references (cached)."""
    missing = [s for s, _ in SPACES if not all(p.exists() for p in space_files(args, s).values())]
    if not missing:
        log(f"prep: cached under {data_dir(args)}")
        return
    n, nq = args.n, args.queries
    rng = np.random.default_rng(n)  # bench_scale scale(): rng = np.random.default_rng(n), visual first
    for space, dim in SPACES:
        if space not in missing:
            replay_base(rng, n, dim, None)  # only to reach the next space's draws
            scale_queries(rng, None, n, dim, SCALE_NQ)
            continue
        files = space_files(args, space)
        t0 = time.perf_counter()
        full_path = data_dir(args) / f"{space}_full.partial.npy"  # float32 before rounding; deleted below
        full = np.lib.format.open_memmap(full_path, mode="w+", dtype=np.float32, shape=(n, dim))
        replay_base(rng, n, dim, full)
        state = rng.bit_generator.state
        drawn = scale_queries(rng, full, n, dim, nq) if args.query_set == "scale" else extra_queries(full, nq)
        rng.bit_generator.state = state
        scale_queries(rng, None, n, dim, SCALE_NQ)  # leave the rng where the scale run left it
        assert drawn is not None
        queries, source = drawn
        if not files["base"].exists():
            write_shard(full, files["base"])
        log(f"{space}: {n:,} rows generated, shard 0 and {nq} queries in {time.perf_counter() - t0:.0f} s")
        t0 = time.perf_counter()
        truth_all = exact_topk(full, queries, K, round16=True)
        truth_shard = exact_topk(np.load(files["base"], mmap_mode="r"), queries, K, round16=False)
        del full
        full_path.unlink()
        for key, array in (("queries", queries), ("source", source)):
            save(files[key], array)
        save(files["truth_shard"], truth_shard)
        save(files["truth_all"], truth_all)
        log(
            f"{space}: exact top-{K} over all {n:,} rows and over shard 0 in {time.perf_counter() - t0:.0f} s;"
            f" queries sourced in shard 0: {int((source % 2 == 0).sum())}/{nq},"
            f" global top-{K} rows in shard 0: {float((truth_all % 2 == 0).mean()):.3f}"
        )


def check(args: argparse.Namespace) -> None:
    """The chunked replay against bench_scale.dataset itself: same queries, shard rows and rng state afterwards."""
    n, nq = args.n, args.queries
    rng_ref = np.random.default_rng(n)
    refs = [dataset(rng_ref, n, dim, None, nq)[:2] for dim in args.dims]
    rng = np.random.default_rng(n)
    d = Path(args.work) / f"check-n{n}"
    d.mkdir(parents=True, exist_ok=True)
    ok = True
    for dim, (ref_base, ref_q) in zip(args.dims, refs, strict=True):
        full = np.lib.format.open_memmap(d / "full.npy", mode="w+", dtype=np.float32, shape=(n, dim))
        replay_base(rng, n, dim, full)
        drawn = scale_queries(rng, full, n, dim, nq)
        assert drawn is not None
        queries = drawn[0]
        write_shard(full, d / "shard.npy")
        shard = np.load(d / "shard.npy")
        same = np.array_equal(queries, ref_q) and np.array_equal(shard, ref_base[0::2])
        log(f"dim {dim}: queries and shard 0 rows identical to bench_scale.dataset: {same}")
        ok = ok and same
        del full
    same_state = rng.bit_generator.state == rng_ref.bit_generator.state
    log(f"rng state after all spaces identical: {same_state}")
    for p in d.iterdir():
        p.unlink()
    d.rmdir()
    if not (ok and same_state):
        raise SystemExit("the replay does not reproduce bench_scale.dataset")


# --- measures ---


def recall_list(found: list[np.ndarray], truth: np.ndarray) -> float:
    if not found:
        return float("nan")
    return recall_at(np.stack([np.pad(f[:K], (0, K - min(K, len(f))), constant_values=-1) for f in found]), truth)


def in_out(found: list[np.ndarray], data: SpaceData) -> str:
    inside = data.source % 2 == 0
    fi = [f for f, m in zip(found, inside, strict=True) if m]
    fo = [f for f, m in zip(found, inside, strict=True) if not m]
    return f"{recall_list(fi, data.truth_shard[inside]):.3f}/{recall_list(fo, data.truth_shard[~inside]):.3f}"


def two_shard_recall(found: list[np.ndarray], truth_all: np.ndarray) -> str:
    """Share of the global top-10 rows living in shard 0 that shard 0 returns, with a 95 % bootstrap CI."""
    hits_l, tot_l = [], []
    for f, t in zip(found, truth_all, strict=True):
        mine = {int(x) // 2 for x in t if x % 2 == 0}
        tot_l.append(len(mine))
        hits_l.append(len(mine & set(f[:K].tolist())))
    hits, tot = np.array(hits_l), np.array(tot_l)
    r = np.random.default_rng(0)
    boots = []
    for _ in range(2000):
        i = r.integers(0, hits.shape[0], hits.shape[0])
        boots.append(hits[i].sum() / max(1, tot[i].sum()))
    lo, hi = np.percentile(boots, [2.5, 97.5])
    return f"{hits.sum() / max(1, tot.sum()):.3f} [{lo:.3f}, {hi:.3f}]"


def cached_index(path: Path, build: Any) -> Any:
    """The index at path, or build() written there (through a temporary name)."""
    if path.exists():
        log(f"loaded {path}")
        return faiss.read_index(str(path))
    t0 = time.perf_counter()
    index = build()
    log(f"built in {time.perf_counter() - t0:.0f} s")
    tmp = path.with_suffix(".partial")
    faiss.write_index(index, str(tmp))
    os.replace(tmp, path)
    return index


def semantic(args: argparse.Namespace) -> None:
    prep(args)
    data = load_space(args, "semantic")
    rows = data.base.shape[0]

    def build() -> Any:
        return build_base("HNSW", SD, data.base, np.arange(rows, dtype=np.int64), AnnParams(), None).index

    index = cached_index(data_dir(args) / "semantic_hnsw.faiss", build)
    h: Any = faiss.downcast_index(index)
    sample = np.arange(0, rows, 997)
    diff = float(np.abs(index.reconstruct_batch(sample) - np.asarray(data.base[sample])).max())
    desc = f"HNSW{h.hnsw.nb_neighbors(1)} fp16 efConstruction {h.hnsw.efConstruction}"
    log(f"semantic: {desc}, ntotal {index.ntotal}; max |reconstructed - stored float16 row|: {diff:.3g}")
    stored16 = np.asarray(data.base).astype(np.float16) if args.rerank else None
    title(args, "semantic", desc, rows)
    print("| efSearch | exact re-rank depth | recall@10 shard | est. 2-shard recall@10 [95% CI] | in/out | CPU ms |")
    print("|---:|---:|---:|---|---|---:|")
    for ef, depth in [(ef, 0) for ef in args.ef] + [(max(args.ef[0], d), d) for d in args.rerank]:
        params: Any = faiss.SearchParametersHNSW()  # type: ignore[attr-defined]
        params.efSearch = max(ef, K)
        found, cpu = [], 0.0
        for q in data.queries:
            c0 = time.process_time()
            if stored16 is not None and depth:
                found.append(rerank(stored16, q[None, :], index.search(q[None, :], depth, params=params)[1][0], K))
            else:
                found.append(index.search(q[None, :], K, params=params)[1][0])
            cpu += time.process_time() - c0
        print(
            f"| {ef} | {depth or '-'} | {recall_list(found, data.truth_shard):.3f} |"
            f" {two_shard_recall(found, data.truth_all)} | {in_out(found, data)} |"
            f" {cpu / len(found) * 1000:.2f} |",
            flush=True,
        )


def visual(args: argparse.Namespace) -> None:
    prep(args)
    data = load_space(args, "visual")
    rows = data.base.shape[0]
    train_rows = min(args.train_rows, rows)

    def build() -> Any:
        # As the 1M run's shard got it: trained on the rows it held at its last retraining, then the rest added.
        index = new_base_index(args.kind, VD, data.base[:train_rows], AnnParams())
        for lo in range(0, rows, CHUNK):
            index.add(np.ascontiguousarray(data.base[lo : lo + CHUNK]))
        if args.kind == "IVFPQ":
            faiss.extract_index_ivf(index).make_direct_map()  # as build_base does
        return index

    stem = "visual_ivfpq" if args.kind == "IVFPQ" else f"visual_{args.kind.lower()}"
    index = cached_index(data_dir(args) / f"{stem}_train{train_rows}.faiss", build)
    ivf = faiss.extract_index_ivf(index)
    pq: Any = faiss.downcast_index(index).pq  # type: ignore[attr-defined]
    fs = "fs" if args.kind == "IVFPQFS" else ""
    desc = f"IVF{ivf.nlist},PQ{pq.M}x{pq.nbits}{fs} trained on {train_rows:,} rows"
    log(f"visual: {desc}, ntotal {index.ntotal}")
    stored16 = np.asarray(data.base).astype(np.float16)  # what the shard re-ranks from (SQLite)
    title(args, "visual", desc, rows)
    print(
        "| nprobe | re-rank depth | recall@10 shard | est. 2-shard recall@10 [95% CI] | in/out | PQ-only recall@10 |"
        " PQ ms | re-rank ms | total CPU ms |"
    )
    print("|---:|---:|---:|---|---|---:|---:|---:|---:|")
    for nprobe in args.nprobe:
        params = faiss.SearchParametersIVF()
        params.nprobe = nprobe
        for depth in args.depths:
            found, pq_only, pq_cpu, rr_cpu = [], [], 0.0, 0.0
            for q in data.queries:
                c0 = time.process_time()
                cand = index.search(q[None, :], depth, params=params)[1][0]
                c1 = time.process_time()
                found.append(rerank(stored16, q[None, :], cand, K))
                rr_cpu += time.process_time() - c1
                pq_cpu += c1 - c0
                pq_only.append(cand[:K])
            nq = len(found)
            print(
                f"| {nprobe} | {depth} | {recall_list(found, data.truth_shard):.3f} |"
                f" {two_shard_recall(found, data.truth_all)} | {in_out(found, data)} |"
                f" {recall_list(pq_only, data.truth_shard):.3f} | {pq_cpu / nq * 1000:.2f} |"
                f" {rr_cpu / nq * 1000:.2f} | {(pq_cpu + rr_cpu) / nq * 1000:.2f} |",
                flush=True,
            )
    if args.filtered:
        filtered(args, index, data)


def filtered(args: argparse.Namespace, index: Any, data: SpaceData) -> None:
    """CPU of a search that scores every allowed row of the base (a selective filter, a cursor page), through the
    shard's own SegmentedSpace: IVF-PQ reconstructs the rows, fast-scan scans every list with a row selector."""
    rows = data.base.shape[0]
    space = SegmentedSpace(args.kind, INDEX_KINDS["Flat"], VD, False, AnnParams())
    space.install(Base(kind=args.kind, index=index, row_labels=np.arange(rows, dtype=np.int64), trained_rows=rows))
    rng = np.random.default_rng(1)
    queries = data.queries[:20]
    print(f"\n{args.kind}: every allowed row scored (exact=True), k = 300, {len(queries)} queries, 1 thread\n")
    print("| allowed rows | CPU ms per query |")
    print("|---:|---:|")
    for n in args.filtered:
        allowed = np.sort(rng.choice(rows, min(n, rows), replace=False)).astype(np.int64)
        c0 = time.process_time()
        for q in queries:
            space.search(q[None, :], 300, allowed, exact=True, rescored=True)
        print(f"| {allowed.shape[0]:,} | {(time.process_time() - c0) / len(queries) * 1000:.2f} |", flush=True)


def title(args: argparse.Namespace, space: str, desc: str, rows: int) -> None:
    print(
        f"\n{space}: {desc}; shard 0 ({rows:,} rows) of the {args.n:,}-image 2-shard set;"
        f" {args.queries} {args.query_set} queries, one at a time, 1 thread\n"
    )


def main(argv: list[str] | None = None) -> int:
    work = os.path.join(tempfile.gettempdir(), "imgsearch-bench-recall")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--work", default=work, help="cache for generated data and built indexes")
    common.add_argument("--n", type=int, default=N_ALL, help="images in the 2-shard set (shard 0 holds half)")
    common.add_argument("--queries", type=int, default=2000, help="queries per space")
    common.add_argument(
        "--query-set",
        choices=["extra", "scale"],
        default="extra",
        help="extra: separate stream (default); scale: the dataset stream, as the scale run draws them",
    )
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="mode", required=True)
    pc = sub.add_parser("check", help="the chunked generator reproduces bench_scale.dataset bit for bit")
    pc.add_argument("--work", default=work)
    pc.add_argument("--n", type=int, default=120_000, help="rows (above 2 x 50k to cross chunk boundaries)")
    pc.add_argument("--dims", type=int, nargs="+", default=[96, 32], help="one per space, in order")
    pc.add_argument("--queries", type=int, default=50)
    sub.add_parser("prep", parents=[common], help="data, shard 0, queries and exact references (cached)")
    ps = sub.add_parser("semantic", parents=[common], help="HNSW: recall and CPU by efSearch")
    pv = sub.add_parser("visual", parents=[common], help="IVF-PQ + re-rank: recall and CPU by nprobe x depth")
    pa = sub.add_parser("all", parents=[common], help="prep, semantic, visual")
    for q in (ps, pa):
        q.add_argument("--ef", type=int, nargs="+", default=[256, 288, 320, 352, 384, 448, 512])
        q.add_argument("--rerank", type=int, nargs="*", default=[], help="also: exact re-rank of this many")
    for q in (pv, pa):
        q.add_argument("--train-rows", type=int, default=380_000, help="IVF-PQ training point (the 1M run's)")
        q.add_argument("--kind", choices=list(IVF_KINDS), default="IVFPQFS", help="the visual base's kind")
        q.add_argument("--nprobe", type=int, nargs="+", default=[32, 64, 96, 128, 160, 192])
        q.add_argument("--depths", type=int, nargs="+", default=[100, 300], help="re-rank depths (candidates)")
        q.add_argument(
            "--filtered", type=int, nargs="*", default=[], help="also: CPU of scoring every one of this many rows"
        )
    args = p.parse_args(argv)
    faiss.omp_set_num_threads(1)
    log("start", " ".join(sys.argv))
    if args.mode == "check":
        check(args)
    elif args.mode == "prep":
        prep(args)
    elif args.mode == "semantic":
        semantic(args)
    elif args.mode == "visual":
        visual(args)
    else:
        semantic(args)
        visual(args)
    print(f"\ncommand: python benchmarks/bench_recall.py {' '.join(sys.argv[1:])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
