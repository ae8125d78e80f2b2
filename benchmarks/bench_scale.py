"""Scale benchmark: approximate index kinds, and real index shards filled through Upsert, against exact FAISS Flat.

Two parts, each measuring every product figure beside exact `Flat` in the same run:

    python benchmarks/bench_scale.py kinds --n 100000           # visual/semantic index kinds in FAISS directly
    python benchmarks/bench_scale.py scale --sizes 10000 100000 # 2 real shard servers (+ gateway) per size
    python benchmarks/bench_scale.py rerank --n 30000           # one shard in process: visual cost by re-rank depth

`kinds` compares, on 1280-d visual and 384-d semantic unit vectors (synthetic clustered vectors with real encoder
embeddings mixed in when ../shared/data/flickr8k exists), the approximate kinds a space could use: build time,
search latency on one thread, recall@10 against exact Flat, and bytes per vector (the serialised index / N).

`scale` starts the stack (encoder, tagger, 2 index shards, gateway) on free loopback ports with the shards'
default (or given) settings, fills the shards through their Upsert RPC (batches of --batch records, durability on,
one writer per shard), waits until the approximate indexes are built, and reports per size: Upsert records/s per
shard, RAM per image (RSS growth of both shard processes / N), restart time (SIGTERM, start, SERVING), Search
p50/p99 and queries/s at 8 and 32 concurrent callers on the shards directly (client-side fan-out to both, like the
gateway) and through the gateway (SearchByText: one encoder call per query), and recall@10 against exact Flat.
The exact reference is a FAISS Flat over the same vectors in this process, queried the same way in the same run.

Real embeddings (cached under --cache, computed once with the encoder's ONNX models): visual features of the
Flickr8k photos and scikit-image samples, and MiniLM embeddings of Flickr8k captions for the semantic space.
"""

from __future__ import annotations

import argparse
import csv
import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
FLICKR = ROOT.parent / "shared" / "data" / "flickr8k"
VD, SD = 1280, 384


# --- data ---


def unit(x: np.ndarray) -> np.ndarray:
    out: np.ndarray = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    return out


def clustered(rng: np.random.Generator, n: int, dim: int, clusters: int, spread: float) -> np.ndarray:
    """Unit vectors around random centres (embeddings have structure; uniform noise on the sphere has none)."""
    centres = rng.standard_normal((clusters, dim), dtype=np.float32)
    out = np.empty((n, dim), np.float32)
    for lo in range(0, n, 50_000):
        hi = min(n, lo + 50_000)
        x = centres[rng.integers(0, clusters, hi - lo)] + spread * rng.standard_normal((hi - lo, dim), dtype=np.float32)
        out[lo:hi] = unit(x)
    return out


def real_embeddings(cache: Path, images: int, captions: int) -> tuple[np.ndarray, np.ndarray] | None:
    """(visual [n, 1280], semantic [m, 384]) real embeddings, computed once and cached; None without ../shared."""
    vis_file, sem_file = cache / "visual.npy", cache / "semantic.npy"
    if vis_file.exists() and sem_file.exists():
        return unit(np.load(vis_file).astype(np.float32)), unit(np.load(sem_file).astype(np.float32))
    if not FLICKR.exists():
        return None
    import skimage

    from imgsearch.models.runtime import ImageModel, TextModel

    model_dir = ROOT / "models"
    cache.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    text = TextModel(model_dir)
    with open(FLICKR / "captions.csv", encoding="utf-8") as f:
        rows = [r["caption"] for r in csv.DictReader(f)]
    pick = np.random.default_rng(0).choice(len(rows), min(captions, len(rows)), replace=False)
    sem = text.encode([rows[i] for i in pick], batch=64)
    image = ImageModel(model_dir)
    paths = sorted((FLICKR / "images").iterdir())[:images]
    sample_dir = Path(skimage.__file__).parent / "data"
    paths += sorted(p for p in sample_dir.iterdir() if p.suffix in {".png", ".jpg"})
    feats = []
    for lo in range(0, len(paths), 16):
        pixels = []
        for p in paths[lo : lo + 16]:
            try:
                pixels.append(image.preprocess_file(p))
            except Exception:  # a sample that is not a photo (e.g. 16-bit, 1 channel)
                continue
        feats.append(image.run(np.stack(pixels))[0])
    vis = unit(np.concatenate(feats))
    np.save(vis_file, vis.astype(np.float16))
    np.save(sem_file, sem.astype(np.float16))
    print(f"real embeddings: {vis.shape[0]} images, {sem.shape[0]} captions in {time.perf_counter() - t0:.0f} s")
    return vis, unit(sem)


def dataset(
    rng: np.random.Generator, n: int, dim: int, real: np.ndarray | None, nq: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(base [n, dim], synthetic queries, real queries): synthetic clustered vectors with the real ones mixed in.

    Synthetic queries are stored vectors plus noise; real queries are held-out real embeddings (not in the base),
    so they are what a query of that kind really looks like. The real rows are spread through the base."""
    base = clustered(rng, n, dim, clusters=max(64, n // 250), spread=0.7)
    real_q = np.zeros((0, dim), np.float32)
    if real is not None and real.shape[0] > nq:
        real_q, held = real[:nq], real[nq:]
        take = min(held.shape[0], n // 2)
        base[rng.choice(n, take, replace=False)] = held[:take]
    noise = base[rng.integers(0, n, nq)] + 0.35 * rng.standard_normal((nq, dim), dtype=np.float32) / np.sqrt(dim / 64)
    # Stored in float16 by the shard: the exact reference scores what the shard stores.
    return base.astype(np.float16).astype(np.float32), unit(noise), real_q


def spill(array: np.ndarray, directory: Path, name: str) -> np.ndarray:
    """The array saved to disk and memory-mapped read-only: its pages are page cache the kernel can drop.

    At 1M images the benchmark's own float32 copy is 6.6 GB; held in anonymous memory beside two shards at their
    bulk-load peak it got a shard OOM-killed on a 24 GB machine.
    """
    path = directory / f"{name}.npy"
    np.save(path, array)
    mapped: np.ndarray = np.load(path, mmap_mode="r")
    return mapped


def exact_topk(base: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    flat = faiss.IndexFlatIP(base.shape[1])
    flat.add(base)
    faiss.omp_set_num_threads(2)
    _, found = flat.search(queries, k)
    return found


def recall_at(found: np.ndarray, truth: np.ndarray, k: int = 10) -> float:
    hits = sum(len(set(f[:k].tolist()) & set(t[:k].tolist())) for f, t in zip(found, truth, strict=True))
    return hits / (k * truth.shape[0])


def pct(values: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def index_bytes(index: Any) -> int:
    return int(faiss.serialize_index(index).nbytes)


# --- kinds (FAISS directly) ---


@dataclass
class KindRow:
    space: str
    kind: str
    params: str
    bytes_per_vec: float
    build_s: float
    p50_ms: float
    p99_ms: float
    recall_syn: float
    recall_real: float


def timed_search(search: Callable[[np.ndarray], np.ndarray], queries: np.ndarray) -> tuple[np.ndarray, list[float]]:
    out, ms = [], []
    for q in queries:
        t0 = time.perf_counter()
        out.append(search(q[None, :]))
        ms.append((time.perf_counter() - t0) * 1000)
    return np.stack(out), ms


def rerank(stored: np.ndarray, q: np.ndarray, cand: np.ndarray, k: int) -> np.ndarray:
    """Exact re-rank of candidate rows from stored float16 vectors (what the shard does from SQLite)."""
    cand = cand[cand >= 0]
    scores = stored[cand].astype(np.float32) @ q[0]
    return cand[np.argsort(-scores)[:k]]


def kinds(args: argparse.Namespace) -> None:
    rng = np.random.default_rng(0)
    real = None if args.no_real else real_embeddings(Path(args.cache), args.real_images, args.real_captions)
    rows: list[KindRow] = []
    k = 10
    spaces = [s for s in ("visual", "semantic") if s in args.spaces]
    for space in spaces:
        dim = VD if space == "visual" else SD
        real_vecs = None if real is None else (real[0] if space == "visual" else real[1])
        base, q_syn, q_real = dataset(rng, args.n, dim, real_vecs, args.queries)
        stored16 = base.astype(np.float16)
        queries = np.concatenate([q_syn, q_real])
        truth = exact_topk(base, queries, k)
        ns = q_syn.shape[0]

        def add_row(
            kind: str,
            params: str,
            nbytes: float,
            build_s: float,
            found: np.ndarray,
            ms: list[float],
            space: str = space,
            ns: int = ns,
            truth: np.ndarray = truth,
        ) -> None:
            real_rows = found.shape[0] > ns
            row = KindRow(
                *(space, kind, params, nbytes, build_s, pct(ms, 50), pct(ms, 99)),
                recall_at(found[:ns], truth[:ns]),
                recall_at(found[ns:], truth[ns:]) if real_rows else float("nan"),
            )
            rows.append(row)
            print(
                f"{row.space} {row.kind:10s} {row.params:28s} {row.bytes_per_vec:7.0f} B  build {row.build_s:6.1f} s"
                f"  p50 {row.p50_ms:6.2f} p99 {row.p99_ms:6.2f} ms  recall syn {row.recall_syn:.3f}"
                f" real {row.recall_real:.3f}",
                flush=True,
            )

        faiss.omp_set_num_threads(1)
        flat = faiss.IndexFlatIP(dim)
        t0 = time.perf_counter()
        flat.add(base)
        build = time.perf_counter() - t0
        exact_index: Any = flat
        found, ms = timed_search(lambda q: exact_index.search(q, k)[1][0], queries)  # noqa: B023 - used at once
        add_row("Flat", "exact float32", 4 * dim, build, found, ms)
        for spec in args.visual_kinds if space == "visual" else args.semantic_kinds:
            measure_kind(spec, dim, base, stored16, queries, k, args, add_row)
    print()
    print("| space | kind | parameters | bytes/vector | build s | p50 ms | p99 ms | recall@10 syn | recall@10 real |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r.space} | {r.kind} | {r.params} | {r.bytes_per_vec:.0f} | {r.build_s:.1f} | {r.p50_ms:.2f} |"
            f" {r.p99_ms:.2f} | {r.recall_syn:.3f} | {r.recall_real:.3f} |"
        )
    print(f"\ncommand: python benchmarks/bench_scale.py {' '.join(sys.argv[1:])}")


def measure_kind(
    spec: str,
    dim: int,
    base: np.ndarray,
    stored16: np.ndarray,
    queries: np.ndarray,
    k: int,
    args: argparse.Namespace,
    add_row: Callable[[str, str, float, float, np.ndarray, list[float]], None],
) -> None:
    """spec: a FAISS factory string, then ':'-separated search settings lists, e.g.
    'IVF1024,PQ160x8:nprobe=16,32:rerank=100,300' or 'HNSW32_SQfp16:efC=64:ef=32,64,128'."""
    n = base.shape[0]
    parts = spec.split(":")
    factory = parts[0]
    opts = {p.split("=")[0]: [int(v) for v in p.split("=")[1].split(",")] for p in parts[1:]}
    faiss.omp_set_num_threads(args.build_threads)
    t0 = time.perf_counter()
    index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    if "efC" in opts:
        hnsw_index: Any = faiss.downcast_index(index)
        hnsw_index.hnsw.efConstruction = opts["efC"][0]
    if not index.is_trained:
        ivf = None
        try:
            ivf = faiss.extract_index_ivf(index)
        except RuntimeError:
            ivf = None
        sample = base
        cap = 64 * ivf.nlist if ivf is not None else 100_000
        if "PQ" in factory:
            cap = max(cap, 256 * 64)
        if n > cap:
            sample = base[np.sort(np.random.default_rng(1).choice(n, cap, replace=False))]
        index.train(sample)
    index.add(base)
    build = time.perf_counter() - t0
    nbytes = index_bytes(index) / n
    faiss.omp_set_num_threads(1)
    is_ivf = "IVF" in factory
    is_hnsw = factory.startswith("HNSW")
    kind = factory.split(",")[0] if not is_ivf else factory
    for probe in opts.get("nprobe", [0]) if is_ivf else opts.get("ef", [0]) if is_hnsw else [0]:
        params: Any = None
        if is_ivf:
            params = faiss.SearchParametersIVF()
            params.nprobe = probe
        elif is_hnsw:
            params = faiss.SearchParametersHNSW()  # type: ignore[attr-defined]
            params.efSearch = max(probe, k)
        for rr in opts.get("rerank", [0]):
            depth = max(k, rr)

            def search(
                q: np.ndarray, depth: int = depth, rr: int = rr, params: Any = params, index: Any = index
            ) -> np.ndarray:
                _, found = index.search(q, depth, params=params) if params is not None else index.search(q, depth)
                return rerank(stored16, q, found[0], k) if rr else found[0][:k]

            found, ms = timed_search(search, queries)
            label = []
            if is_ivf:
                label.append(f"nprobe={probe}")
            if is_hnsw:
                label.append(f"efC={opts.get('efC', [40])[0]} ef={probe}")
            if rr:
                label.append(f"rerank={rr}")
            add_row(kind, " ".join(label) or "-", nbytes, build, found, ms)


# --- scale (real servers) ---


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "imgsearch-bench-embeddings"))
    p.add_argument("--real-images", type=int, default=8091, help="Flickr8k photos to embed (once, cached)")
    p.add_argument("--real-captions", type=int, default=20000, help="Flickr8k captions to embed (once, cached)")
    p.add_argument("--no-real", action="store_true", help="synthetic vectors only")
    p.add_argument("--queries", type=int, default=200, help="queries of each kind (synthetic, real)")
    sub = p.add_subparsers(dest="mode", required=True)
    pk = sub.add_parser("kinds", help="compare approximate index kinds in FAISS directly")
    pk.add_argument("--n", type=int, default=100_000)
    pk.add_argument("--spaces", nargs="+", default=["visual", "semantic"])
    pk.add_argument("--build-threads", type=int, default=2)
    pk.add_argument(
        "--visual-kinds",
        nargs="+",
        default=[
            "IVF316,PQ160x8:nprobe=16,32:rerank=100,300",
            "IVF316,PQ320x4fs:nprobe=16,32:rerank=100,300",
            "IVF316,SQ4:nprobe=16,32:rerank=0,100",
            "SQ4:rerank=0,100",
            "HNSW16_SQ4:efC=64:ef=64,128:rerank=0,100",
        ],
    )
    pk.add_argument(
        "--semantic-kinds",
        nargs="+",
        default=[
            "HNSW32_SQfp16:efC=64:ef=32,64,128",
            "HNSW16_SQfp16:efC=64:ef=32,64,128",
            "HNSW32_SQ8:efC=64:ef=64,128",
        ],
    )
    ps = sub.add_parser("scale", help="real shard servers filled through Upsert")
    ps.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 300_000])
    ps.add_argument("--batch", type=int, default=500)
    ps.add_argument("--writers", type=int, default=1, help="concurrent Upsert calls per shard")
    ps.add_argument("--calls", type=int, default=400, help="search calls per concurrency level")
    ps.add_argument("--no-gateway", action="store_true", help="skip the calls through the gateway")
    ps.add_argument("--concurrency", type=int, nargs="+", default=[8, 32])
    ps.add_argument("--build-timeout", type=float, default=900.0, help="most seconds to wait for background builds")
    ps.add_argument("--env", nargs="*", default=[], help="KEY=VALUE settings for the shards (IMGSEARCH_INDEX_...)")
    ps.add_argument("--tmp", default=None, help="directory for the shards' data (default: the system's temp dir)")
    pf = sub.add_parser("fill", help="bulk Upsert rate of 2 shard servers only (A/B against another code tree)")
    pf.add_argument("--n", type=int, default=60_000, help="records in all (half per shard)")
    pf.add_argument("--batch", type=int, default=500)
    pf.add_argument("--writers", type=int, default=1, help="concurrent Upsert calls per shard")
    pf.add_argument("--rounds", type=int, default=1, help="fills per variant, variants alternating")
    pf.add_argument(
        "--variants",
        nargs="+",
        default=["this"],
        help="NAME (the working tree) or NAME=DIR (a tree whose DIR/imgsearch/index shadows this one), then "
        "';KEY=VALUE' settings of that variant's shards",
    )
    pf.add_argument("--env", nargs="*", default=[], help="KEY=VALUE settings for the shards (IMGSEARCH_INDEX_...)")
    pf.add_argument("--search-calls", type=int, default=0, help="then this many Search/Get calls on shard 0")
    pf.add_argument("--no-prefetch", action="store_true", help="build each request only once the last one returned")
    pf.add_argument("--profile", default="", help="py-spy raw profile of shard 0 to this path prefix (per variant)")
    pr = sub.add_parser("rerank", help="visual search cost in one shard (in process) by re-rank depth")
    pr.add_argument("--n", type=int, default=30_000)
    pr.add_argument("--depths", type=int, nargs="+", default=[300, 100, 0])
    args = p.parse_args(argv)
    if args.mode == "kinds":
        kinds(args)
    elif args.mode == "rerank":
        rerank_cost(args)
    elif args.mode == "fill":
        fill(args)
    else:
        scale(args)
    return 0


def rerank_cost(args: argparse.Namespace) -> None:
    """One ShardIndex in process (no RPC), IVF-PQ visual base over N random unit vectors; search latency per
    re-rank depth (0: PQ scores only). Shows what the exact re-rank from SQLite costs next to FAISS."""
    from imgsearch.index.core import RecordInput, ShardIndex, Space
    from imgsearch.index.settings import IndexSettings

    rng = np.random.default_rng(0)
    vis = unit(rng.standard_normal((args.n, VD), dtype=np.float32))
    print("| re-rank depth | p50 ms | mean ms |\n|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        for depth in args.depths:
            idx = ShardIndex(
                IndexSettings(
                    data_dir=Path(tmp) / f"s{depth}",
                    shard="rerank",
                    snapshot_every=10**9,
                    snapshot_interval_seconds=1e9,
                    use_gpu=False,
                    ann_min_vectors=min(10_000, args.n),
                    background_build=False,
                    rerank=depth,
                )
            )
            try:
                for lo in range(0, args.n, 1000):
                    idx.upsert([RecordInput(id=f"r{i}", visual=vis[i]) for i in range(lo, min(args.n, lo + 1000))])
                idx.build_indexes()
                ms = []
                for q in vis[: args.queries]:
                    t0 = time.perf_counter()
                    idx.search(Space.VISUAL, q, 10)
                    ms.append((time.perf_counter() - t0) * 1000)
            finally:
                idx.close(final_snapshot=False)
            print(f"| {depth} | {pct(ms, 50):.2f} | {float(np.mean(ms)):.2f} |", flush=True)
    print(f"\ncommand: python benchmarks/bench_scale.py {' '.join(sys.argv[1:])}")


def upsert_requests(rows: np.ndarray, vis: np.ndarray, sem: np.ndarray, head: str, batch: int) -> Iterator[Any]:
    """UpsertRequests of these rows as `scale` sends them: packed float16 vectors, one head, one metadata entry."""
    from imgsearch.api.common.v1 import common_pb2
    from imgsearch.api.index.v1 import index_pb2

    for lo in range(0, rows.shape[0], batch):
        part = rows[lo : lo + batch]
        # One float16 conversion per batch rather than per vector; the proto constructors are the rest.
        v16, s16 = vis[part].astype("<f2"), sem[part].astype("<f2")
        yield index_pb2.UpsertRequest(
            records=[
                index_pb2.Record(
                    id=f"r{i}",
                    visual=common_pb2.FloatVector(packed_f16=v16[j].tobytes()),
                    semantics=[
                        index_pb2.SemanticVector(head=head, vector=common_pb2.FloatVector(packed_f16=s16[j].tobytes()))
                    ],
                    metadata={"album": f"a{i % 10}"},
                )
                for j, i in enumerate(part.tolist())
            ]
        )


def prefetched(items: Iterator[Any], depth: int = 2) -> Iterator[Any]:
    """The items of an iterator made on a thread of their own, up to `depth` ahead: the next request is built
    while the current one is in flight (a loader that builds, then waits, leaves the shard idle meanwhile)."""
    ahead: queue.Queue[Any] = queue.Queue(depth)
    done = object()

    def run() -> None:
        try:
            for item in items:
                ahead.put(item)
        finally:
            ahead.put(done)

    threading.Thread(target=run, daemon=True).start()
    while (item := ahead.get()) is not done:
        yield item


def searches(stub: Any, sem: np.ndarray, vis: np.ndarray, calls: int, rnd: int, name: str) -> None:
    """Search (semantic and visual, k = 10) and Get (10 ids) q/s on one filled shard, 8 callers."""
    from imgsearch.api.common.v1 import common_pb2
    from imgsearch.api.index.v1 import index_pb2

    def req(space: Any, q: np.ndarray) -> Any:
        vec = common_pb2.FloatVector(packed_f32=q.astype("<f4").tobytes())
        return index_pb2.SearchRequest(space=space, k=10, query=vec, semantic_head="h@1" if space == 2 else "")

    sem_reqs = [req(common_pb2.SPACE_SEMANTIC, sem[i]) for i in range(0, 400, 2)]
    vis_reqs = [req(common_pb2.SPACE_VISUAL, vis[i]) for i in range(0, 400, 2)]
    gets = [index_pb2.GetRequest(ids=[f"r{2 * (i + j)}" for j in range(10)]) for i in range(200)]
    for what, call in (
        ("Search semantic", lambda i: stub.Search(sem_reqs[i % 200], timeout=60)),
        ("Search visual", lambda i: stub.Search(vis_reqs[i % 200], timeout=60)),
        ("Get 10 ids", lambda i: stub.Get(gets[i % 200], timeout=60)),
    ):
        r = load(call, calls, 8)
        print(f"|   {rnd} | {name} | {what}, 8 callers: {r.qps:,.0f} q/s, p50 {r.p50_ms:.2f} ms | | | | |", flush=True)


def fill(args: argparse.Namespace) -> None:
    """Two shard servers (no gateway, encoder or tagger), filled at once through Upsert by this process, one
    thread per shard; per variant and round: records/s per shard and the client's share of the time."""
    import grpc

    from imgsearch.api.index.v1 import index_pb2_grpc
    from imgsearch.devstack import ServiceSpec, Stack, free_port_range, stop_pids

    rng = np.random.default_rng(0)
    vis = unit(rng.standard_normal((args.n, VD), dtype=np.float32))
    sem = unit(rng.standard_normal((args.n, SD), dtype=np.float32))
    extra = dict(kv.split("=", 1) for kv in args.env)
    variants: list[tuple[str, str, dict[str, str]]] = []
    for spec in args.variants:
        head, *settings = spec.split(";")
        name, _, tree = head.partition("=")
        variants.append((name, tree, dict(kv.split("=", 1) for kv in settings)))
    print(
        "| round | variant | records/s per shard | fill s | client wait s per shard | shard CPU µs/record | "
        "of which builder | client CPU µs/record |\n|---:|---|---|---:|---:|---|---|---:|"
    )
    for rnd in range(args.rounds):
        for name, tree, own in variants:
            with tempfile.TemporaryDirectory() as tmp:
                stack = Stack(Path(tmp))
                base = free_port_range(10)
                env_path = {"PYTHONPATH": f"{tree}:{os.environ.get('PYTHONPATH', '')}"} if tree else {}
                specs = []
                for si in range(2):
                    shard = f"index-{si}"
                    env = {
                        "IMGSEARCH_INDEX_SHARD": shard,
                        "IMGSEARCH_INDEX_DATA_DIR": str(Path(tmp) / shard),
                        "IMGSEARCH_INDEX_HOST": "127.0.0.1",
                        "IMGSEARCH_INDEX_PORT": str(base + si),
                        "IMGSEARCH_INDEX_METRICS_HOST": "127.0.0.1",
                        "IMGSEARCH_INDEX_METRICS_PORT": str(base + 5 + si),
                        **env_path,
                        **extra,
                        **own,
                    }
                    specs.append(ServiceSpec(shard, "index", base + si, base + 5 + si, env))
                for spec in specs:
                    stack.spawn(spec)
                prof = None
                try:
                    stack.wait_serving(specs, 120)
                    opts = [("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20)]
                    channels = [grpc.insecure_channel(s.address, options=opts) for s in specs]
                    stubs = [index_pb2_grpc.IndexServiceStub(c) for c in channels]
                    if args.profile:
                        out = f"{args.profile}-{name}.txt"
                        cmd = [str(Path(sys.executable).parent / "py-spy"), "record", "-p", str(specs[0].pid)]
                        cmd += ["-d", "600", "-f", "raw", "-o", out, "--nonblocking"]
                        prof = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                        time.sleep(1.0)
                    building = [0.0, 0.0]

                    def write(si: int, stubs: list[Any] = stubs, building: list[float] = building) -> float:
                        rows = np.arange(si, args.n, 2)
                        t0 = time.perf_counter()

                        def part(writer: int) -> None:
                            reqs = upsert_requests(rows[writer :: args.writers], vis, sem, "h@1", args.batch)
                            if not args.no_prefetch:
                                reqs = prefetched(reqs)
                            while True:
                                t1 = time.perf_counter()
                                req = next(reqs, None)
                                building[si] += time.perf_counter() - t1
                                if req is None:
                                    break
                                out = stubs[si].Upsert(req, timeout=600)
                                if any(r.HasField("error") for r in out.results):
                                    raise RuntimeError(f"upsert failed: {out.results[0]}")

                        with ThreadPoolExecutor(args.writers) as writers:
                            list(writers.map(part, range(args.writers)))
                        return rows.shape[0] / (time.perf_counter() - t0)

                    hz = os.sysconf("SC_CLK_TCK")
                    cpu0 = [cpu_ticks([s.pid]) for s in specs]
                    niced0 = [niced_ticks(s.pid) for s in specs]
                    me0 = os.times()
                    t0 = time.perf_counter()
                    with ThreadPoolExecutor(2) as pool:
                        rates = list(pool.map(write, range(2)))
                    wall = time.perf_counter() - t0
                    me1 = os.times()
                    # CPU per record (µs): each shard process over its records, this process over all of them.
                    shard_us = [
                        (cpu_ticks([s.pid]) - c) / hz / (args.n / 2) * 1e6 for s, c in zip(specs, cpu0, strict=True)
                    ]
                    builder_us = [
                        (niced_ticks(s.pid) - c) / hz / (args.n / 2) * 1e6 for s, c in zip(specs, niced0, strict=True)
                    ]
                    client_us = (me1.user + me1.system - me0.user - me0.system) / args.n * 1e6
                    print(
                        f"| {rnd} | {name} | {rates[0]:,.0f} / {rates[1]:,.0f} | {wall:.1f} | "
                        f"{building[0]:.1f} / {building[1]:.1f} | {shard_us[0]:.0f} / {shard_us[1]:.0f} | "
                        f"{builder_us[0]:.0f} / {builder_us[1]:.0f} | {client_us:.0f} |",
                        flush=True,
                    )
                    if args.search_calls:
                        searches(stubs[0], sem, vis, args.search_calls, rnd, name)
                    for c in channels:
                        c.close()
                finally:
                    if prof is not None:
                        prof.send_signal(signal.SIGINT)
                        prof.wait(60)
                    stop_pids([s.pid for s in specs], 60.0)
    print(f"\ncommand: python benchmarks/bench_scale.py {' '.join(sys.argv[1:])}")


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def stat_fields(stat: Path) -> list[str]:
    """The fields of a /proc stat file after the command name (index 11/12: user/system ticks, 16: nice)."""
    return stat.read_text().rsplit(")", 1)[1].split()


def cpu_ticks(pids: Sequence[int]) -> int:
    total = 0
    for pid in pids:
        fields = stat_fields(Path(f"/proc/{pid}/stat"))
        total += int(fields[11]) + int(fields[12])
    return total


def niced_ticks(pid: int) -> int:
    """CPU ticks of a process's threads that run nicer than its main thread: a shard's background builder."""
    main_nice = int(stat_fields(Path(f"/proc/{pid}/stat"))[16])
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            fields = stat_fields(task / "stat")
        except OSError:  # the thread ended meanwhile
            continue
        if int(fields[16]) > main_nice:
            total += int(fields[11]) + int(fields[12])
    return total


def wait_idle(pids: Sequence[int], timeout: float) -> float:
    """Wait until these processes use under 5 % of a core over 3 s (background builds done); returns seconds."""
    t0 = time.perf_counter()
    hz = os.sysconf("SC_CLK_TCK")
    while time.perf_counter() - t0 < timeout:
        before = cpu_ticks(pids)
        time.sleep(3.0)
        if (cpu_ticks(pids) - before) / hz < 0.15:
            break
    return time.perf_counter() - t0


@dataclass
class Load:
    """Search latency and throughput of one kind of call at one concurrency."""

    p50_ms: float
    p99_ms: float
    qps: float


def load(call: Callable[[int], object], calls: int, concurrency: int) -> Load:
    ms: list[float] = []
    lock = threading.Lock()

    def one(i: int) -> None:
        t0 = time.perf_counter()
        call(i)
        dt = (time.perf_counter() - t0) * 1000
        with lock:
            ms.append(dt)

    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(one, range(min(concurrency * 2, calls))))  # warm-up
        ms.clear()
        t0 = time.perf_counter()
        list(pool.map(one, range(calls)))
        wall = time.perf_counter() - t0
    return Load(pct(ms, 50), pct(ms, 99), calls / wall)


def scale(args: argparse.Namespace) -> None:
    import grpc

    from imgsearch.api.common.v1 import common_pb2
    from imgsearch.api.index.v1 import index_pb2, index_pb2_grpc
    from imgsearch.client import GatewayClient
    from imgsearch.devstack import Stack, alive, free_port_range, health, log_tail, stop_pids

    real = None if args.no_real else real_embeddings(Path(args.cache), args.real_images, args.real_captions)
    for key, value in (kv.split("=", 1) for kv in args.env):
        os.environ[key] = value
    print("shard settings from the environment:", {k: v for k, v in os.environ.items() if "INDEX_" in k})
    results: list[dict[str, Any]] = []
    for n in args.sizes:
        rng = np.random.default_rng(n)
        nq = args.queries
        vis, vq_syn, vq_real = dataset(rng, n, VD, None if real is None else real[0], nq)
        sem, sq_syn, sq_real = dataset(rng, n, SD, None if real is None else real[1], nq)
        spill_dir = tempfile.TemporaryDirectory(prefix="imgsearch-bench-", dir=args.tmp)
        vis, sem = spill(vis, Path(spill_dir.name), "visual"), spill(sem, Path(spill_dir.name), "semantic")
        spaces = {
            "visual": (vis, np.concatenate([vq_syn, vq_real]), vq_syn.shape[0]),
            "semantic": (sem, np.concatenate([sq_syn, sq_real]), sq_syn.shape[0]),
        }
        res: dict[str, Any] = {"n": n}
        with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
            stack = Stack(Path(tmp))
            specs = stack.up(free_port_range(20), free_port_range(20), shards=2, timeout=300)
            try:
                gateway = next(s for s in specs if s.name == "gateway").address
                shards = [s for s in specs if s.module == "index"]
                with GatewayClient(gateway, timeout=60) as client:
                    head = next(f"{h.name}@{h.version}" for h in client.list_heads() if h.active)
                opts = [("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20)]
                channels = [grpc.insecure_channel(s.address, options=opts) for s in shards]
                stubs = [index_pb2_grpc.IndexServiceStub(c) for c in channels]
                rss0 = [rss_kib(s.pid) for s in shards]

                def write(si: int, n: int = n, vis: np.ndarray = vis, sem: np.ndarray = sem, head: str = head) -> float:
                    rows = np.arange(si, n, 2)
                    t0 = time.perf_counter()

                    def part(writer: int) -> None:
                        mine = rows[writer :: args.writers]
                        for req in prefetched(upsert_requests(mine, vis, sem, head, args.batch)):
                            out = stubs[si].Upsert(req, timeout=600)  # noqa: B023 - called before stubs changes
                            bad = [r for r in out.results if r.HasField("error")]
                            if bad:
                                raise RuntimeError(f"upsert failed: {bad[0]}")

                    with ThreadPoolExecutor(args.writers) as writers:
                        list(writers.map(part, range(args.writers)))
                    return rows.shape[0] / (time.perf_counter() - t0)

                t0 = time.perf_counter()
                with ThreadPoolExecutor(2) as pool:
                    rates = list(pool.map(write, range(2)))
                res["fill_s"] = time.perf_counter() - t0
                res["upsert_per_shard"] = rates
                res["build_wait_s"] = wait_idle([s.pid for s in shards], args.build_timeout)
                stats = [st.Stats(index_pb2.StatsRequest(), timeout=30) for st in stubs]
                res["served"] = dict(stats[0].served_index_types)
                res["rss_filled_mib"] = [rss_kib(s.pid) / 1024 for s in shards]
                res["bytes_per_image_filled"] = (sum(rss_kib(s.pid) for s in shards) - sum(rss0)) * 1024 / n

                # Restart each shard: SIGTERM (final snapshot) until exit, then start until SERVING.
                restarts = []
                for spec in shards:
                    t0 = time.perf_counter()
                    stop_pids([spec.pid], 120.0)
                    t1 = time.perf_counter()
                    stack.spawn(spec)
                    stack.wait_serving([spec], 600)
                    restarts.append((t1 - t0, time.perf_counter() - t1))
                stack.save(specs)
                res["restart"] = restarts
                # Fresh connections to the restarted processes.
                for c in channels:
                    c.close()
                channels = [grpc.insecure_channel(s.address, options=opts) for s in shards]
                stubs = [index_pb2_grpc.IndexServiceStub(c) for c in channels]
                time.sleep(1.0)
                res["rss_restarted_mib"] = [rss_kib(s.pid) / 1024 for s in shards]
                res["bytes_per_image_restarted"] = (sum(rss_kib(s.pid) for s in shards) - sum(rss0)) * 1024 / n
                assert all(health(s.address) == "SERVING" for s in shards)

                for space, (base, queries, ns) in spaces.items():
                    enum = common_pb2.SPACE_VISUAL if space == "visual" else common_pb2.SPACE_SEMANTIC
                    truth = exact_topk(base, queries, 10)
                    halves = [np.arange(si, n, 2) for si in range(2)]
                    flats = []
                    for h in halves:
                        f = faiss.IndexFlatIP(base.shape[1])
                        f.add(base[h])
                        flats.append(f)
                    reqs = [
                        index_pb2.SearchRequest(
                            space=enum,
                            k=10,
                            query=common_pb2.FloatVector(packed_f32=q.astype("<f4").tobytes()),
                            semantic_head=head if space == "semantic" else "",
                        )
                        for q in queries
                    ]

                    def fan_out(i: int, reqs: list[Any] = reqs) -> list[int]:
                        futures = [st.Search.future(reqs[i % len(reqs)], timeout=60) for st in stubs]  # noqa: B023
                        hits = [h for fut in futures for h in fut.result().hits]
                        hits.sort(key=lambda h: -h.score)
                        return [int(h.id[1:]) for h in hits[:10]]

                    def exact(i: int, queries: np.ndarray = queries, flats: list[Any] = flats) -> None:
                        faiss.omp_set_num_threads(1)
                        q = queries[i % queries.shape[0]][None, :]
                        for f in flats:
                            f.search(q, 10)

                    found = np.array([fan_out(i) for i in range(queries.shape[0])])
                    res[f"{space}_recall"] = (
                        recall_at(found[:ns], truth[:ns]),
                        recall_at(found[ns:], truth[ns:]) if queries.shape[0] > ns else float("nan"),
                    )
                    for c in args.concurrency:
                        res[f"{space}_shards_{c}"] = load(fan_out, args.calls, c)
                        res[f"{space}_flat_{c}"] = load(exact, args.calls, c)
                    del flats
                if not args.no_gateway:
                    captions = ["two dogs playing in the snow", "a man riding a bike", "children at the beach"]
                    captions += [f"a photo of {w}" for w in ("a red car", "a cat", "mountains", "a city street")]
                    with GatewayClient(gateway, timeout=60) as client:
                        for c in args.concurrency:
                            res[f"gateway_text_{c}"] = load(
                                lambda i: client.search_text(f"{captions[i % 7]} {i}", k=10),  # noqa: B023
                                args.calls,
                                c,
                            )
                        photo = sorted((FLICKR / "images").iterdir())[0] if FLICKR.exists() else None
                        if photo is not None:
                            data = photo.read_bytes()
                            res["gateway_image_8"] = load(
                                lambda i: client.search_image(data, k=10),  # noqa: B023
                                args.calls // 2,
                                8,
                            )
                for c in channels:
                    c.close()
            except BaseException:
                for spec in specs:
                    if spec.module == "index":
                        log = log_tail(stack.logs / f"{spec.name}.log")
                        print(
                            f"--- {spec.name} ({stack.exit_note(spec) if not alive(spec.pid) else 'alive'}) ---\n{log}"
                        )
                raise
            finally:
                stack.down()
        del vis, sem, spaces
        spill_dir.cleanup()
        results.append(res)
        report(res)
    print(f"\ncommand: python benchmarks/bench_scale.py {' '.join(sys.argv[1:])}")


def report(r: dict[str, Any]) -> None:
    n = r["n"]
    up = r["upsert_per_shard"]
    print(f"\n### N = {n:,} ({n // 2:,} per shard); served: {r['served']}\n")
    print(
        f"- fill through Upsert: {r['fill_s']:.1f} s; records/s per shard (both writing at once): "
        f"{up[0]:,.0f} / {up[1]:,.0f}; background builds finished {r['build_wait_s']:.0f} s after the fill"
    )
    print(
        f"- RSS per shard after fill: {r['rss_filled_mib'][0]:.0f} / {r['rss_filled_mib'][1]:.0f} MiB "
        f"({r['bytes_per_image_filled']:,.0f} B per image); after restart: {r['rss_restarted_mib'][0]:.0f} / "
        f"{r['rss_restarted_mib'][1]:.0f} MiB ({r['bytes_per_image_restarted']:,.0f} B per image)"
    )
    print(
        "- restart (SIGTERM until exit + start until SERVING): "
        + ", ".join(f"{a:.1f} + {b:.1f} s" for a, b in r["restart"])
    )
    print()
    print("| call | callers | p50 ms | p99 ms | q/s | exact Flat p50 / p99 ms, q/s | q/s ratio | recall@10 syn/real |")
    print("|---|---:|---:|---:|---:|---|---:|---|")
    for space in ("visual", "semantic"):
        rs, rr = r[f"{space}_recall"]
        for key in sorted((k for k in r if k.startswith(f"{space}_shards_")), key=lambda k: int(k.rsplit("_", 1)[1])):
            c = key.rsplit("_", 1)[1]
            a, f = r[key], r[f"{space}_flat_{c}"]
            print(
                f"| Search {space} (2 shards, direct) | {c} | {a.p50_ms:.2f} | {a.p99_ms:.2f} | {a.qps:.0f} | "
                f"{f.p50_ms:.2f} / {f.p99_ms:.2f}, {f.qps:.0f} | {a.qps / f.qps:.2f} | {rs:.3f} / {rr:.3f} |"
            )
    for key in sorted(
        (k for k in r if k.startswith("gateway_")), key=lambda k: (k.rsplit("_", 1)[0], int(k.rsplit("_", 1)[1]))
    ):
        a = r[key]
        what = "SearchByText (gateway)" if "text" in key else "SearchByImage visual (gateway)"
        print(f"| {what} | {key.rsplit('_', 1)[1]} | {a.p50_ms:.2f} | {a.p99_ms:.2f} | {a.qps:.0f} | | | |")


if __name__ == "__main__":
    sys.exit(main())
