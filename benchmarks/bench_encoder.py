"""Encoder core benchmark: images/s and request latency per batch size, micro-batching under concurrency, texts/s."""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import shlex
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from imgsearch.encoder.core import Encoder, ImageItem
from imgsearch.encoder.imaging import ImageLimits, decode_image
from imgsearch.encoder.settings import EncoderSettings
from imgsearch.models.manifest import default_model_dir

PHOTOS = (
    "chelsea.png",
    "coffee.png",
    "astronaut.png",
    "rocket.jpg",
    "motorcycle_left.png",
    "horse.png",
    "hubble_deep_field.jpg",
    "camera.png",
)
SENTENCES = (
    "a cat sleeping on a sofa",
    "a red double-decker bus in the rain",
    "two dogs playing fetch on the beach at sunset",
    "a cup of espresso on a wooden table",
    "an astronaut floating above the earth",
    "a rocket lifting off from the launch pad",
)


@dataclass
class Row:
    case: str
    batch: int
    items_per_s: float
    p50_ms: float
    p95_ms: float
    requests: int


def photos() -> list[bytes]:
    import skimage

    data = Path(skimage.__file__).parent / "data"
    return [(data / name).read_bytes() for name in PHOTOS]


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) * 1000.0


async def measure(case: str, batch: int, call: Callable[[], Awaitable[int]], seconds: float, min_reps: int) -> Row:
    """Repeat call() sequentially for about `seconds` (at least min_reps times) after one warm-up call."""
    await call()
    latencies: list[float] = []
    items = 0
    start = time.perf_counter()
    while len(latencies) < min_reps or time.perf_counter() - start < seconds:
        t0 = time.perf_counter()
        items += await call()
        latencies.append(time.perf_counter() - t0)
    total = time.perf_counter() - start
    return Row(case, batch, items / total, percentile(latencies, 50), percentile(latencies, 95), len(latencies))


async def run(args: argparse.Namespace) -> tuple[list[Row], tuple[str, ...]]:
    settings = EncoderSettings(
        model_dir=args.model_dir,
        providers=args.providers,
        intra_op_threads=args.threads,
        image_workers=args.workers,
        max_batch=max(32, *args.batch_sizes),
        max_wait_ms=args.max_wait_ms,
    )
    encoder = await asyncio.to_thread(Encoder, settings)
    await asyncio.to_thread(encoder.warm_up)
    data = photos()
    size = encoder.manifest.image_size
    rows: list[Row] = []
    try:
        pixels = [decode_image(d, size, ImageLimits()).pixels for d in data]

        async def decode_only() -> int:
            for d in data:
                decode_image(d, size, ImageLimits())
            return len(data)

        rows.append(await measure("decode only (1 thread)", 1, decode_only, args.seconds / 2, 2))

        for b in args.batch_sizes:
            batch_pixels = [pixels[i % len(pixels)] for i in range(b)]

            workers = encoder.image_batcher.workers

            async def model_only(batch_pixels: list[np.ndarray] = batch_pixels, workers: int = workers) -> int:
                # One batch per session at once, as the batcher runs them.
                await asyncio.gather(*(asyncio.to_thread(encoder.infer_images, batch_pixels) for _ in range(workers)))
                return len(batch_pixels) * workers

            rows.append(await measure(f"image model only ({workers} sessions)", b, model_only, args.seconds, 3))

        for b in args.batch_sizes:
            items = [ImageItem(data[i % len(data)], PHOTOS[i % len(data)]) for i in range(b)]

            async def end_to_end(items: list[ImageItem] = items) -> int:
                await encoder.encode_images(items)
                return len(items)

            rows.append(await measure("encode_images (decode + model)", b, end_to_end, args.seconds, 3))

        one = [ImageItem(data[0], PHOTOS[0])]
        concurrency: int = args.concurrency

        async def concurrent_singles() -> int:
            await asyncio.gather(*(encoder.encode_images(one) for _ in range(concurrency)))
            return concurrency

        before = encoder.image_batcher.stats.batches, encoder.image_batcher.stats.items
        row = await measure(f"{concurrency} concurrent 1-image requests", 1, concurrent_singles, args.seconds, 3)
        batches = encoder.image_batcher.stats.batches - before[0]
        row.case += f" (mean batch {(encoder.image_batcher.stats.items - before[1]) / max(batches, 1):.1f})"
        rows.append(row)

        for b in (1, 32):
            texts = [SENTENCES[i % len(SENTENCES)] for i in range(b)]

            async def encode_texts(texts: list[str] = texts) -> int:
                await encoder.encode_texts(texts)
                return len(texts)

            rows.append(await measure("encode_texts", b, encode_texts, args.seconds / 2, 3))
    finally:
        await encoder.close()
    return rows, encoder.providers


def table(rows: list[Row]) -> str:
    lines = [
        "| case | batch | items/s | p50 ms / call | p95 ms / call | calls |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r.case} | {r.batch} | {r.items_per_s:.1f} | {r.p50_ms:.1f} | {r.p95_ms:.1f} | {r.requests} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model-dir", type=Path, default=default_model_dir())
    parser.add_argument("--providers", default="CPUExecutionProvider", help="comma-separated, best first")
    parser.add_argument("--threads", type=int, default=0, help="ONNX Runtime intra-op threads (0 = ORT default)")
    parser.add_argument("--workers", type=int, default=0, help="image model sessions (0 = the encoder's default)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--seconds", type=float, default=4.0, help="time budget per case")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--max-wait-ms", type=float, default=5.0)
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    rows, providers = asyncio.run(run(args))
    print(table(rows))
    print()
    print(
        f"providers {', '.join(providers)}; {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"Python {platform.python_version()}; took {time.perf_counter() - t0:.0f} s"
    )
    print(f"command: python {shlex.join(['benchmarks/bench_encoder.py', *(sys.argv[1:] if argv is None else argv)])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
