"""Encoder benchmark: images/s and latency per batch, micro-batching, texts/s; --text-service: fp32 vs int8 text."""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import shlex
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np

from imgsearch.api.encoder.v1 import encoder_pb2, encoder_pb2_grpc
from imgsearch.devstack import free_port_range
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
# Search-box queries of the lengths people type, for the text service comparison.
QUERIES = (
    "dog",
    "red car",
    "a cat sleeping on a sofa",
    "children playing in a fountain on a hot day",
    "a man in a blue jacket riding a bicycle down a muddy forest trail",
    "sunset over the sea",
    "two dogs playing fetch on the beach at sunset",
    "a crowd of people at an outdoor concert at night with bright stage lights",
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
        max_batch=args.max_batch or max(32, *args.batch_sizes),
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

        one_pixels = [pixels[0]]

        async def concurrent_pixels() -> int:
            # The batcher alone: decoded pixels from many callers, one image each, batched dynamically.
            await asyncio.gather(*(encoder.image_batcher.submit(one_pixels) for _ in range(concurrency)))
            return concurrency

        for label, call in (
            (f"{concurrency} concurrent 1-image requests", concurrent_singles),
            (f"{concurrency} concurrent 1-image model calls (pixels; no decode)", concurrent_pixels),
        ):
            before = encoder.image_batcher.stats.batches, encoder.image_batcher.stats.items
            row = await measure(label, 1, call, args.seconds, 3)
            batches = encoder.image_batcher.stats.batches - before[0]
            row.case += f" (mean batch {(encoder.image_batcher.stats.items - before[1]) / max(batches, 1):.1f})"
            rows.append(row)

        if not args.skip_text:
            rows += await text_rows(encoder, settings, args.seconds / 2)
    finally:
        await encoder.close()
    return rows, encoder.providers


async def text_rows(encoder: Encoder, settings: EncoderSettings, seconds: float) -> list[Row]:
    """encode_texts of the served text model beside the fp32 anchor, alternating, in the same run."""
    encoders = {encoder.text_model.variant: encoder}
    anchor = encoders.get("fp32")
    if anchor is None:
        anchor = await asyncio.to_thread(Encoder, settings.model_copy(update={"text_precision": "fp32"}))
        await asyncio.to_thread(anchor.warm_up)
    try:
        cases = [("fp32", anchor)] + [(v, e) for v, e in encoders.items() if v != "fp32"]
        rows: list[Row] = []
        for b in (1, 32):
            texts = [SENTENCES[i % len(SENTENCES)] for i in range(b)]
            for variant, enc in cases:

                async def encode_texts(enc: Encoder = enc, texts: list[str] = texts) -> int:
                    await enc.encode_texts(texts)
                    return len(texts)

                label = "encode_texts, fp32 text (anchor)" if variant == "fp32" else f"encode_texts, {variant} text"
                rows.append(await measure(label, b, encode_texts, seconds, 3))
        return rows
    finally:
        if anchor is not encoder:
            await anchor.close()


@dataclass(frozen=True)
class TextService:
    """One real encoder server (a subprocess) serving the text model at one precision and thread count."""

    precision: str
    threads: int
    port: int
    proc: subprocess.Popen[bytes]

    @property
    def label(self) -> str:
        return f"{self.precision} text, {self.threads} thread{'s' if self.threads > 1 else ''}"


def start_text_service(args: argparse.Namespace, precision: str, threads: int, port: int) -> TextService:
    env = {
        **os.environ,
        "IMGSEARCH_MODEL_DIR": str(args.model_dir),
        "IMGSEARCH_ENCODER_HOST": "127.0.0.1",
        "IMGSEARCH_ENCODER_PORT": str(port),
        "IMGSEARCH_ENCODER_METRICS_HOST": "127.0.0.1",
        "IMGSEARCH_ENCODER_METRICS_PORT": "0",
        "IMGSEARCH_ENCODER_PROVIDERS": args.providers,
        "IMGSEARCH_ENCODER_MAX_WAIT_MS": str(args.max_wait_ms),
        "IMGSEARCH_ENCODER_TEXT_PRECISION": precision,
        "IMGSEARCH_ENCODER_TEXT_THREADS": str(threads),
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "imgsearch.encoder"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    return TextService(precision, threads, port, proc)


async def wait_ready(service: TextService, timeout: float = 180.0) -> str:
    """The text model version GetModelInfo reports, once the server answers."""
    deadline = time.monotonic() + timeout
    async with grpc.aio.insecure_channel(f"127.0.0.1:{service.port}") as channel:
        stub = encoder_pb2_grpc.EncoderServiceStub(channel)
        while True:
            if service.proc.poll() is not None:
                raise RuntimeError(f"encoder ({service.label}) exited with {service.proc.returncode}")
            try:
                info = await stub.GetModelInfo(encoder_pb2.GetModelInfoRequest(), timeout=2)
                return str(info.text_model_version)
            except grpc.aio.AioRpcError:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.5)


async def text_load(stub: encoder_pb2_grpc.EncoderServiceAsyncStub, callers: int, seconds: float) -> list[float]:
    """`callers` clients, each sending one-query EncodeTexts calls back to back for `seconds`: latencies."""
    latencies: list[float] = []
    stop = time.perf_counter() + seconds

    async def caller(k: int) -> None:
        i = k
        while time.perf_counter() < stop:
            request = encoder_pb2.EncodeTextsRequest(texts=[QUERIES[i % len(QUERIES)]])
            t0 = time.perf_counter()
            await stub.EncodeTexts(request, timeout=30)
            latencies.append(time.perf_counter() - t0)
            i += 1

    await asyncio.gather(*(caller(k) for k in range(callers)))
    return latencies


async def text_service(args: argparse.Namespace) -> list[str]:
    """fp32 and int8 text through real encoder servers, per thread count and caller count, rounds alternated.

    Every server runs the whole time and each case is measured in short slices, rotated every round, so
    load from other jobs on shared CPUs falls on all cases alike; ratios are to the first fp32 case.
    """
    combos = [(p, t) for t in args.text_threads for p in ("fp32", "int8")]
    base = free_port_range(len(combos))
    services = [start_text_service(args, p, t, base + i) for i, (p, t) in enumerate(combos)]
    lines: list[str] = []
    try:
        versions = [await wait_ready(s) for s in services]
        channels = [grpc.aio.insecure_channel(f"127.0.0.1:{s.port}") for s in services]
        stubs = [encoder_pb2_grpc.EncoderServiceStub(ch) for ch in channels]
        lat: dict[tuple[int, int], list[float]] = {(i, c): [] for i in range(len(services)) for c in args.callers}
        spent: dict[tuple[int, int], float] = dict.fromkeys(lat, 0.0)
        for i in range(len(services)):  # warm-up: first calls pay for allocation
            await text_load(stubs[i], max(args.callers), 0.5)
        for r in range(args.rounds):
            order = [(r + k) % len(services) for k in range(len(services))]
            for i in order:
                for c in args.callers:
                    t0 = time.perf_counter()
                    lat[i, c] += await text_load(stubs[i], c, args.seconds / args.rounds)
                    spent[i, c] += time.perf_counter() - t0
        for ch in channels:
            await ch.close()
        lines += [
            "| text model (encoder server) | callers | queries/s | p50 ms | p95 ms | calls | queries/s vs first fp32 |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for c in args.callers:
            anchor = len(lat[0, c]) / spent[0, c]
            for i, s in enumerate(services):
                qps = len(lat[i, c]) / spent[i, c]
                lines.append(
                    f"| {s.label} | {c} | {qps:.1f} | {percentile(lat[i, c], 50):.1f} | "
                    f"{percentile(lat[i, c], 95):.1f} | {len(lat[i, c])} | {qps / anchor:.2f} |"
                )
        lines.append("")
        lines += [f"{s.label}: GetModelInfo text_model_version {v}" for s, v in zip(services, versions, strict=True)]
    finally:
        for s in services:
            s.proc.terminate()
        for s in services:
            try:
                s.proc.wait(30)
            except subprocess.TimeoutExpired:
                s.proc.kill()
    return lines


def table(rows: list[Row]) -> str:
    lines = [
        "| case | batch | items/s | p50 ms / call | p95 ms / call | calls |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r.case} | {r.batch} | {r.items_per_s:.1f} | {r.p50_ms:.1f} | {r.p95_ms:.1f} | {r.requests} |")
    return "\n".join(lines)


LOAD_BEFORE = os.getloadavg()


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
    parser.add_argument("--max-batch", type=int, default=0, help="the batcher's largest batch (0 = largest size)")
    parser.add_argument("--skip-text", action="store_true", help="image rows only (no text model timings)")
    parser.add_argument(
        "--text-service",
        action="store_true",
        help="instead: fp32 vs int8 text through real encoder servers (EncodeTexts over gRPC, one query a call)",
    )
    parser.add_argument("--text-threads", type=int, nargs="+", default=[1, 2], help="text session threads to try")
    parser.add_argument("--callers", type=int, nargs="+", default=[1, 8], help="concurrent callers (--text-service)")
    parser.add_argument("--rounds", type=int, default=5, help="alternation rounds (--text-service)")
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    if args.text_service:
        print("\n".join(asyncio.run(text_service(args))))
        providers: tuple[str, ...] = tuple(args.providers.split(","))
    else:
        rows, providers = asyncio.run(run(args))
        print(table(rows))
    print()
    print(
        f"providers {', '.join(providers)}; {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"Python {platform.python_version()}; load average before/after "
        f"{LOAD_BEFORE[0]:.1f}/{os.getloadavg()[0]:.1f}; took {time.perf_counter() - t0:.0f} s"
    )
    print(f"command: python {shlex.join(['benchmarks/bench_encoder.py', *(sys.argv[1:] if argv is None else argv)])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
