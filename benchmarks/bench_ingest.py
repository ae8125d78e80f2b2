"""Ingest and cheap-call benchmark: every figure is measured beside its anchor in the same run.

1. Model only (plain ONNX Runtime, 224-px pixels already decoded, batches of 16): the fp32 model in a default
   session (the anchor), the int8 model in a default session, and the int8 model as the encoder runs it (one
   single-threaded session per core, batches side by side).
2. Ingest of 224-px photos through a real local stack (encoder, tagger, 2 index shards, gateway; the SDK's
   streaming add): Flickr8k test photos when ../shared/data/flickr8k exists, else scikit-image's sample photos
   resized to 224 px. The fp32 anchor is measured again right after, with the stack idle.
3. 12 MP camera photos (4000x3000 JPEGs made from the sample photos by upscaling) end to end through the stack.
4. Search by id, then by text (k=10, 2 shards; a different text each call), with 8 callers against a bare
   grpc.aio echo server (one process, the same sync client and 8 threads), echo measured before and after; each
   with the CPU seconds every process spent meanwhile.

    python benchmarks/bench_ingest.py                   # about 2-3 minutes on 2 vCPUs
    python benchmarks/bench_ingest.py --images 200 --camera 60 --seconds 3   # quick
    python benchmarks/bench_ingest.py --configs on "off|IMGSEARCH_GATEWAY_THUMBNAILS=false"   # settings A/B
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import io
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
from PIL import Image

from imgsearch.client import GatewayClient, ImageToAdd
from imgsearch.devstack import Stack, free_port_range
from imgsearch.models.imaging import ImageLimits, decode_image
from imgsearch.models.manifest import ModelManifest, default_model_dir
from imgsearch.models.runtime import CPU, GPU_PROVIDERS

FLICKR = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "flickr8k"
SAMPLES = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png", "horse.png")
ECHO_METHOD = "/bench.Echo/Echo"
BATCH = 16


def sample_dir() -> Path:
    import skimage

    return Path(skimage.__file__).parent / "data"


def photos_224(n: int) -> tuple[list[bytes], str]:
    """n encoded 224-px photos and where they came from."""
    split = FLICKR / "splits" / "test.txt"
    if split.exists():
        names = split.read_text().split()[:n]
        return [(FLICKR / "images" / name).read_bytes() for name in names], f"Flickr8k test split (first {n})"
    out = []
    sources = [Image.open(sample_dir() / name).convert("RGB") for name in SAMPLES]
    for i in range(n):
        img = sources[i % len(sources)]
        # A different crop per image so the encoder never sees identical bytes twice.
        dx, dy = (i * 7) % 40, (i * 13) % 40
        crop = img.crop((dx, dy, img.width - 40 + dx, img.height - 40 + dy)).resize((224, 224))
        buf = io.BytesIO()
        crop.save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out, f"scikit-image sample photos resized to 224 px ({n})"


def camera_photos(n: int) -> list[bytes]:
    """n distinct 4000x3000 JPEGs (quality 92) made by upscaling the sample photos."""
    out = []
    sources = [Image.open(sample_dir() / name).convert("RGB") for name in SAMPLES]
    for i in range(n):
        img = sources[i % len(sources)]
        dx = i // len(sources)
        big = img.crop((dx, 0, img.width - 20 + dx, img.height)).resize((4000, 3000), Image.Resampling.BILINEAR)
        buf = io.BytesIO()
        big.save(buf, "JPEG", quality=92)
        out.append(buf.getvalue())
    return out


# ---- model only ------------------------------------------------------------------------------------------


def session(path: Path, threads: int = 0, providers: tuple[str, ...] = (CPU,)) -> object:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), opts, providers=list(providers))


def cpu_ms_per(work: Callable[[bytes], object], items: list[bytes]) -> float:
    """Milliseconds of this thread's CPU time per item."""
    t0 = time.thread_time()
    for item in items:
        work(item)
    return (time.thread_time() - t0) / len(items) * 1000


def model_rate(sessions: list[object], pixels: np.ndarray, seconds: float) -> float:
    """Images/s with one thread per session running batches back to back for `seconds`."""
    count = [0] * len(sessions)
    for s in sessions:
        s.run(None, {"pixels": pixels})  # type: ignore[attr-defined]
    stop = time.perf_counter() + seconds

    def loop(i: int) -> None:
        while time.perf_counter() < stop:
            sessions[i].run(None, {"pixels": pixels})  # type: ignore[attr-defined]
            count[i] += len(pixels)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=loop, args=(i,)) for i in range(len(sessions))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(count) / (time.perf_counter() - t0)


# Query texts for search by text: a different one each call, so no layer can answer from a cache.
WORDS = ("dog", "cat", "man", "woman", "child", "beach", "street", "ball", "snow", "bike")


# ---- echo server -----------------------------------------------------------------------------------------


def echo_server(port: int) -> None:
    """A bare grpc.aio server answering one unary method with its request bytes (no protobuf parsing)."""
    import asyncio

    from grpc import aio

    async def echo(request: bytes, context: object) -> bytes:
        return request

    async def serve() -> None:
        handler = grpc.method_handlers_generic_handler(
            "bench.Echo", {"Echo": grpc.unary_unary_rpc_method_handler(echo)}
        )
        server = aio.server()
        server.add_generic_rpc_handlers((handler,))
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        print("ready", flush=True)
        await server.wait_for_termination()

    asyncio.run(serve())


def cpu_seconds(pids: dict[str, int]) -> dict[str, float]:
    """User + system CPU seconds each process has used so far (Linux /proc), this process as "client"."""
    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    for name, pid in {**pids, "client": os.getpid()}.items():
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        out[name] = (int(fields[11]) + int(fields[12])) / tick
    return out


def cpu_split(before: dict[str, float], after: dict[str, float], wall: float) -> str:
    used = {k: after[k] - before[k] for k in before}
    parts = ", ".join(f"{k} {v:.1f}" for k, v in sorted(used.items(), key=lambda kv: -kv[1]) if v >= 0.05)
    return f"{parts}; {sum(used.values()):.1f} CPU s in {wall:.1f} s = {sum(used.values()) / wall:.2f} cores"


def qps(call: Callable[[], object], callers: int, seconds: float) -> float:
    """Calls/s with `callers` threads calling back to back for `seconds` (after one warm-up call each)."""
    stop = time.perf_counter() + seconds
    counts = [0] * callers

    def loop(i: int) -> None:
        call()
        while time.perf_counter() < stop:
            call()
            counts[i] += 1

    t0 = time.perf_counter()
    with ThreadPoolExecutor(callers) as pool:
        list(pool.map(loop, range(callers)))
    return sum(counts) / (time.perf_counter() - t0)


@contextlib.contextmanager
def local_stack() -> Iterator[tuple[str, dict[str, int]]]:
    """A real local stack (encoder, tagger, 2 index shards, gateway): its gateway address and process ids."""
    with tempfile.TemporaryDirectory() as tmp:
        stack = Stack(Path(tmp))
        specs = stack.up(free_port_range(20), free_port_range(20), shards=2, timeout=300)
        gateway = next(s for s in specs if s.name == "gateway").address
        pids: dict[str, int] = {}
        for spec in stack.load():
            pids[spec.name if spec.name not in pids else f"{spec.name}-{spec.pid}"] = spec.pid
        try:
            yield gateway, pids
        finally:
            stack.down()


def warm_up(client: GatewayClient, photos: list[bytes]) -> None:
    """Connections, sessions and the shards' first writes, before anything is timed."""
    client.add_images(ImageToAdd(photos[i % len(photos)], f"warm-{i}") for i in range(2 * BATCH))


def timed_add(client: GatewayClient, pids: dict[str, int], images: Iterable[ImageToAdd]) -> tuple[float, str]:
    """Seconds to add the images in one streaming call (every one stored), and the CPU each process spent."""
    cpu0, t0 = cpu_seconds(pids), time.perf_counter()
    outcomes = client.add_images(images)
    took = time.perf_counter() - t0
    assert all(o.ok for o in outcomes), [o for o in outcomes if not o.ok][:3]
    return took, cpu_split(cpu0, cpu_seconds(pids), took)


def ingest_configs(configs: list[str], photos: list[bytes], passes: int) -> list[str]:
    """The 224-px ingest alone, through a fresh stack per configuration, `passes` times each.

    A configuration is LABEL[|NAME=VALUE...]: environment variables the stack's services start with, so
    settings are compared in one run (e.g. `off|IMGSEARCH_GATEWAY_THUMBNAILS=false`).
    """
    lines = ["| configuration | pass | images/s | CPU seconds per process |", "|---|---:|---:|---|"]
    for config in configs:
        label, *pairs = config.split("|")
        saved = dict(os.environ)
        os.environ.update(dict(pair.partition("=")[::2] for pair in pairs))
        try:
            with local_stack() as (gateway, pids), GatewayClient(gateway, timeout=600) as client:
                warm_up(client, photos)
                for r in range(passes):
                    took, cpu = timed_add(client, pids, (ImageToAdd(d, f"p{r}-{i}") for i, d in enumerate(photos)))
                    lines.append(f"| {label} | {r + 1} | {len(photos) / took:.1f} | {cpu} |")
                    print(lines[-1], file=sys.stderr, flush=True)
        finally:
            os.environ.clear()
            os.environ.update(saved)
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=1000, help="224-px photos to ingest")
    p.add_argument("--camera", type=int, default=150, help="12 MP photos to ingest")
    p.add_argument("--seconds", type=float, default=6.0, help="per model-only and per queries/s figure")
    p.add_argument("--callers", type=int, default=8)
    p.add_argument("--model-dir", type=Path, default=default_model_dir())
    p.add_argument(
        "--providers",
        default=CPU,
        help="comma-separated, best first: the anchor's session and the stack's encoder (IMGSEARCH_ENCODER_PROVIDERS)",
    )
    p.add_argument(
        "--configs",
        nargs="+",
        metavar="LABEL[|NAME=VALUE...]",
        help="instead: only the 224-px ingest, through a fresh stack per configuration (environment for the stack)",
    )
    p.add_argument("--passes", type=int, default=2, help="ingests per configuration (--configs)")
    args = p.parse_args(argv)
    providers = tuple(args.providers.split(","))
    on_gpu = any(p in GPU_PROVIDERS for p in providers)
    # The stack's encoder inherits this process's environment.
    os.environ["IMGSEARCH_ENCODER_PROVIDERS"] = args.providers
    started = time.perf_counter()
    cpus = len(os.sched_getaffinity(0))
    manifest = ModelManifest.load(args.model_dir)
    fp32_file = args.model_dir / manifest.image_file
    int8_file = args.model_dir / manifest.image_int8.file if manifest.image_int8 else None

    photos, source = photos_224(args.images)
    if args.configs:
        out = [f"224-px photos: {source}; providers {args.providers}", ""]
        out += ingest_configs(args.configs, photos, args.passes)
        out.append("")
        out.append(
            f"{platform.processor() or platform.machine()}, {cpus} CPUs, Python {platform.python_version()}; "
            f"took {time.perf_counter() - started:.0f} s"
        )
        out.append(
            f"command: python {shlex.join(['benchmarks/bench_ingest.py', *(sys.argv[1:] if argv is None else argv)])}"
        )
        print("\n".join(out))
        return 0
    pixels = np.stack([decode_image(d, manifest.image_size, ImageLimits()).pixels for d in photos[:BATCH]])
    lines: list[str] = []
    rows: list[tuple[str, str, str]] = []

    fp32 = session(fp32_file, providers=providers)
    fp32_before = model_rate([fp32], pixels, args.seconds)
    where = f" on {providers[0]}" if on_gpu else ""
    rows.append((f"model only: fp32, default ORT session{where} (anchor)", f"{fp32_before:.1f} images/s", "1.00"))
    # int8 QDQ is the encoder's CPU model only; on a GPU it serves fp32.
    if int8_file is not None and not on_gpu:
        int8 = model_rate([session(int8_file)], pixels, args.seconds)
        rows.append(("model only: int8, default ORT session", f"{int8:.1f} images/s", f"{int8 / fp32_before:.2f}"))
        per_core = model_rate([session(int8_file, 1) for _ in range(cpus)], pixels, args.seconds)
        rows.append(
            (
                f"model only: int8, {cpus} sessions x 1 thread (the encoder's default)",
                f"{per_core:.1f} images/s",
                f"{per_core / fp32_before:.2f}",
            )
        )

    camera = camera_photos(min(args.camera, 24))
    camera_mb = sum(map(len, camera)) / len(camera) / 2**20
    t0 = time.perf_counter()
    for d in camera[:6]:
        decode_image(d, manifest.image_size, ImageLimits())
    decode_ms = (time.perf_counter() - t0) / 6 * 1000
    # What one 224-px photo costs the encoder before the model, without and with its thumbnail (the gateway's
    # default 160 px): CPU time of one thread over the ingested photos, the better of two passes.
    prep_ms: dict[int, float] = {}
    for px in (0, 160):
        prep = functools.partial(decode_image, size=manifest.image_size, limits=ImageLimits(), thumbnail_px=px)
        prep_ms[px] = min(cpu_ms_per(prep, photos) for _ in range(2))

    with local_stack() as (gateway, pids):
        echo_port = free_port_range(1)
        echo = subprocess.Popen(
            [sys.executable, __file__, "--echo-server", str(echo_port)], stdout=subprocess.PIPE, text=True
        )
        try:
            assert echo.stdout is not None and echo.stdout.readline().strip() == "ready"
            with GatewayClient(gateway, timeout=600) as client:
                warm_up(client, photos)
                ingest_s, cpu = timed_add(client, pids, (ImageToAdd(d, f"p{i}") for i, d in enumerate(photos)))
                ingest = len(photos) / ingest_s
                lines.append(f"CPU seconds during the 224-px ingest: {cpu}")
                fp32_after = model_rate([fp32], pixels, args.seconds)
                anchor = (fp32_before + fp32_after) / 2
                rows.append(
                    (
                        f"ingest through the gateway: {len(photos)} photos of 224 px, one streaming call",
                        f"{ingest:.1f} images/s ({ingest_s:.1f} s)",
                        f"{ingest / anchor:.2f}",
                    )
                )
                rows.append(("model only: fp32 anchor again, stack idle", f"{fp32_after:.1f} images/s", ""))
                rows.append(
                    (
                        "  (one 224-px decode without / with its 160-px thumbnail, one thread, for scale)",
                        f"{prep_ms[0]:.2f} / {prep_ms[160]:.2f} ms",
                        "",
                    )
                )

                cams = (ImageToAdd(camera[i % len(camera)], f"cam{i}") for i in range(args.camera))
                camera_s, cpu = timed_add(client, pids, cams)
                lines.append(f"CPU seconds during the camera ingest: {cpu}")
                rows.append(
                    (
                        f"ingest: {args.camera} camera photos 4000x3000 JPEG ({camera_mb:.1f} MiB each) end to end",
                        f"{args.camera / camera_s:.1f} images/s ({camera_s:.1f} s)",
                        "",
                    )
                )
                rows.append(("  (one 12 MP decode to 224 px, one thread, for scale)", f"{decode_ms:.1f} ms", ""))

                with grpc.insecure_channel(f"127.0.0.1:{echo_port}") as channel:
                    echo_call: grpc.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(ECHO_METHOD)
                    payload = b"\x0a\x02p1\x10\x0a"  # about a SearchByIdRequest's size
                    echo_before = qps(lambda: echo_call(payload, timeout=10), args.callers, args.seconds)
                    ids = [f"p{i}" for i in range(min(len(photos), 256))]
                    counter = iter(range(10**9))
                    cpu0, t_id = cpu_seconds(pids), time.perf_counter()
                    by_id = qps(lambda: client.similar(ids[next(counter) % len(ids)], k=10), args.callers, args.seconds)
                    by_id_s = time.perf_counter() - t_id
                    lines.append(f"CPU seconds during search by id: {cpu_split(cpu0, cpu_seconds(pids), by_id_s)}")
                    counter = iter(range(10**9))

                    def text() -> object:
                        i = next(counter)
                        return client.search_text(f"a {WORDS[i % 10]} and a {WORDS[(i // 10) % 10]} {i}", k=10)

                    cpu0, t_text = cpu_seconds(pids), time.perf_counter()
                    by_text = qps(text, args.callers, args.seconds)
                    text_s, cpu1 = time.perf_counter() - t_text, cpu_seconds(pids)
                    per_call = sum(cpu1[k] - cpu0[k] for k in cpu0) / (by_text * text_s) * 1000
                    lines.append(
                        f"CPU seconds during search by text: {cpu_split(cpu0, cpu1, text_s)}"
                        f" ({per_call:.1f} ms of CPU per call)"
                    )
                    echo_after = qps(lambda: echo_call(payload, timeout=10), args.callers, args.seconds)
                echo_mean = (echo_before + echo_after) / 2
                rows.append(
                    (
                        f"bare grpc.aio echo, {args.callers} callers (anchor; before / after)",
                        f"{echo_before:.0f} / {echo_after:.0f} q/s",
                        "1.00",
                    )
                )
                rows.append(
                    (
                        f"search by id (k=10, 2 shards), {args.callers} callers",
                        f"{by_id:.0f} q/s",
                        f"{by_id / echo_mean:.2f}",
                    )
                )
                rows.append(
                    (
                        f"search by text (k=10, 2 shards), {args.callers} callers",
                        f"{by_text:.0f} q/s",
                        f"{by_text / echo_mean:.2f}",
                    )
                )
        finally:
            echo.terminate()
            echo.wait(10)

    lines.insert(0, f"224-px photos: {source}")
    lines.append("")
    lines.append("| case | measured | ratio to its anchor |")
    lines.append("|---|---:|---:|")
    lines += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    lines.append("")
    load = os.getloadavg()
    lines.append(
        f"{platform.processor() or platform.machine()}, {cpus} CPUs, load average {load[0]:.1f} at the end, "
        f"Python {platform.python_version()}; took {time.perf_counter() - started:.0f} s"
    )
    lines.append(
        f"command: python {shlex.join(['benchmarks/bench_ingest.py', *(sys.argv[1:] if argv is None else argv)])}"
    )
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--echo-server":
        echo_server(int(sys.argv[2]))
        sys.exit(0)
    sys.exit(main())
