"""End-to-end latency and throughput through the gateway of a real local stack (CPU, loopback)."""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from imgsearch.client import GatewayClient, ImageToAdd
from imgsearch.devstack import Stack, free_port_range

FLICKR = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "flickr8k"
QUERIES = ["two dogs playing in the snow", "a man riding a bike", "children at the beach", "a cup of coffee"]


def gallery(n: int) -> list[Path]:
    """Flickr8k test photos when ../shared is there, else scikit-image's sample photos."""
    split = FLICKR / "splits" / "test.txt"
    if split.exists():
        names = split.read_text().split()[:n]
        return [FLICKR / "images" / name for name in names]
    import skimage

    data = Path(skimage.__file__).parent / "data"
    return sorted(p for p in data.iterdir() if p.suffix in {".png", ".jpg"})[:n]


def timed(fn: Callable[[], object], repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1000)
    return out


def pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[int(q) - 1] if len(values) > 1 else values[0]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--images", type=int, default=1000)
    p.add_argument("--repeats", type=int, default=50)
    p.add_argument("--concurrency", type=int, default=8)
    args = p.parse_args()
    files = gallery(args.images)
    with tempfile.TemporaryDirectory() as tmp:
        stack = Stack(Path(tmp))
        specs = stack.up(free_port_range(20), free_port_range(20), shards=2, timeout=300)
        gateway = next(s for s in specs if s.name == "gateway").address
        try:
            with GatewayClient(gateway, timeout=600) as client:
                t0 = time.perf_counter()
                outcomes = client.add_images(ImageToAdd.from_path(f, f.stem) for f in files)
                add_s = time.perf_counter() - t0
                assert all(o.ok for o in outcomes), [o for o in outcomes if not o.ok][:3]
                probe = files[0].read_bytes()
                rows = [
                    ("search-text", timed(lambda: client.search_text(QUERIES[0], k=10), args.repeats)),
                    ("search-image (visual)", timed(lambda: client.search_image(probe, k=10), args.repeats)),
                    (
                        "search-image (semantic)",
                        timed(lambda: client.search_image(probe, k=10, space="semantic"), args.repeats),
                    ),
                    ("similar (by id)", timed(lambda: client.similar(files[0].stem, k=10), args.repeats)),
                    ("tag (top 10)", timed(lambda: client.tag(probe, k=10), args.repeats)),
                ]
                n = args.repeats * 2
                t0 = time.perf_counter()
                with ThreadPoolExecutor(args.concurrency) as pool:
                    list(pool.map(lambda i: client.search_text(QUERIES[i % len(QUERIES)], k=10), range(n)))
                qps = n / (time.perf_counter() - t0)
        finally:
            stack.down()
    print(f"\nGallery: {len(files)} images in 2 shards; add: {len(files) / add_s:.1f} images/s ({add_s:.1f} s)\n")
    print("| call | p50 ms | p95 ms | mean ms |")
    print("|---|---:|---:|---:|")
    for name, ms in rows:
        print(f"| {name} | {pct(ms, 50):.1f} | {pct(ms, 95):.1f} | {statistics.fmean(ms):.1f} |")
    print(f"\nsearch-text throughput at concurrency {args.concurrency}: {qps:.1f} queries/s")
    print(f"\ncommand: python benchmarks/bench_e2e.py --images {args.images} --repeats {args.repeats}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
