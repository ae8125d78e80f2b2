"""Encoder workers: several model sessions run batches side by side, so every core does inference."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest
import pytest_asyncio

from imgsearch.encoder.batching import MicroBatcher
from imgsearch.encoder.core import Encoder, ImageEncoding, ImageItem, image_workers
from imgsearch.encoder.settings import EncoderSettings


async def test_two_workers_run_two_batches_at_the_same_time() -> None:
    inside, release = threading.Barrier(2, timeout=5), threading.Event()
    threads: set[str] = set()

    def model(batch: list[int]) -> list[int]:
        threads.add(threading.current_thread().name)
        inside.wait()  # only passes when two batches are in the model at once
        release.wait(5)
        return [x * 2 for x in batch]

    batcher: MicroBatcher[int, int] = MicroBatcher("image", model, max_batch=2, max_wait_s=0.0, max_queue=16, workers=2)
    first = asyncio.create_task(batcher.submit([1, 2]))
    second = asyncio.create_task(batcher.submit([3, 4]))
    await asyncio.sleep(0.2)
    release.set()
    assert await first == [2, 4] and await second == [6, 8]
    assert len(threads) == 2 and batcher.stats.batches == 2
    await batcher.close()


async def test_a_third_batch_waits_for_a_free_worker_and_collects_what_queued_meanwhile() -> None:
    started, release = threading.Semaphore(0), threading.Event()
    ran: list[list[int]] = []

    def model(batch: list[int]) -> list[int]:
        ran.append(batch)
        started.release()
        release.wait(5)
        return batch

    batcher: MicroBatcher[int, int] = MicroBatcher("image", model, max_batch=8, max_wait_s=0.0, max_queue=16, workers=2)
    busy = []
    for i in (0, 1):
        busy.append(asyncio.create_task(batcher.submit([i])))
        assert await asyncio.to_thread(started.acquire, True, 5)
    later = [asyncio.create_task(batcher.submit([i])) for i in (2, 3, 4)]
    await asyncio.sleep(0.05)
    assert len(ran) == 2  # both workers busy: nothing else has started
    release.set()
    assert [await t for t in busy] == [[0], [1]] and [await t for t in later] == [[2], [3], [4]]
    assert sorted(map(sorted, ran)) == [[0], [1], [2, 3, 4]]  # the waiting items went as one batch
    await batcher.close()


def test_workers_must_be_positive() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        MicroBatcher("image", lambda b: b, max_batch=1, max_wait_s=0.0, max_queue=1, workers=0)


@pytest.mark.parametrize(
    ("workers", "intra", "on_gpu", "cpus", "expected"),
    [
        (0, 0, False, 2, (2, 1)),  # one single-threaded session per core
        (0, 0, False, 16, (8, 2)),  # at most 8 sessions; the cores are shared out
        (1, 0, False, 4, (1, 4)),
        (2, 3, False, 4, (2, 3)),  # explicit threads win
        (0, 0, True, 16, (1, 0)),  # one GPU session; ORT picks its threads
        (2, 0, True, 16, (2, 0)),
    ],
)
def test_worker_count_and_threads(
    model_dir: Path, workers: int, intra: int, on_gpu: bool, cpus: int, expected: tuple[int, int]
) -> None:
    settings = EncoderSettings(model_dir=model_dir, image_workers=workers, intra_op_threads=intra)
    assert image_workers(settings, on_gpu, cpus) == expected


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def two_worker_encoder(model_dir: Path) -> AsyncIterator[Encoder]:
    enc = await asyncio.to_thread(
        Encoder, EncoderSettings(model_dir=model_dir, image_workers=2, max_batch=2, max_wait_ms=0)
    )
    await asyncio.to_thread(enc.warm_up)
    yield enc
    await enc.close()


async def test_sessions_agree_and_concurrent_requests_use_both(
    two_worker_encoder: Encoder, sample_photos: dict[str, bytes]
) -> None:
    enc = two_worker_encoder
    assert len(enc.image_models) == 2 and enc.image_batcher.workers == 2
    assert all(m.manifest.image_version == enc.manifest.image_version for m in enc.image_models)
    items = [ImageItem(sample_photos[n], n) for n in ("cat", "coffee", "rocket", "horse")]
    alone = [(await enc.encode_images([item]))[0] for item in items]
    together = await asyncio.gather(*(enc.encode_images(items[i : i + 2]) for i in (0, 2)))
    for a, b in zip(alone, [r for pair in together for r in pair], strict=True):
        assert isinstance(a, ImageEncoding) and isinstance(b, ImageEncoding)
        np.testing.assert_allclose(a.features, b.features, atol=1e-3)
