"""Dynamic micro-batching: items from concurrent requests share one model call in a worker thread.

With several workers (one per model session, see EncoderSettings.image_workers) batches run side by side:
the next batch is collected while the others run, and goes to the first worker that is free.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Generic, TypeVar

import grpc

from imgsearch.encoder import metrics
from imgsearch.kit.errors import ImgsearchError, ResourceExhausted, Unavailable

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")


class DeadlineExceeded(ImgsearchError):
    """The caller's deadline passed before the item reached the model, so it was never run."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


@dataclass(eq=False)
class _Pending(Generic[T, R]):
    item: T
    future: asyncio.Future[R]
    # Both in loop.time() seconds.
    enqueued: float
    # None means the caller set no deadline.
    deadline: float | None


@dataclass
class BatchStats:
    """What the batcher did so far; tests and benchmarks read it, metrics carry the same facts."""

    batches: int = 0
    items: int = 0
    expired: int = 0
    largest: int = 0


class MicroBatcher(Generic[T, R]):
    """Collect items into batches of up to max_batch, waiting at most max_wait after the first one.

    `workers` threads run the model (default one, so batches of one kind never compete for the same
    cores); items that arrive while every worker is busy are picked up together as the next batch.
    run_batch must be safe to call from `workers` threads at once (e.g. one model session per thread).
    """

    def __init__(
        self,
        kind: str,
        run_batch: Callable[[list[T]], Sequence[R]],
        max_batch: int,
        max_wait_s: float,
        max_queue: int,
        workers: int = 1,
    ) -> None:
        if workers < 1:
            raise ValueError(f"workers must be at least 1, got {workers}")
        self.kind = kind
        self.workers = workers
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.max_queue = max_queue
        self.stats = BatchStats()
        self._run_batch = run_batch
        self._queue: asyncio.Queue[_Pending[T, R]] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix=f"encoder-{kind}")
        self._free = asyncio.Semaphore(workers)
        self._running: set[asyncio.Task[None]] = set()
        self._closed = False

    def check_capacity(self, n: int) -> None:
        """Raise ResourceExhausted if n more items would overflow the queue (callers check before costly prep)."""
        if self._closed:
            raise Unavailable("the encoder is shutting down")
        if self._queue.qsize() + n > self.max_queue:
            raise ResourceExhausted(
                f"the {self.kind} queue is full ({self._queue.qsize()} waiting, limit {self.max_queue}); retry later"
            )

    async def submit(self, items: Sequence[T], deadline: float | None = None) -> list[R]:
        """Results for items, in order, once the batches holding them have run."""
        if not items:
            return []
        loop = asyncio.get_running_loop()
        if deadline is not None and deadline <= loop.time():
            raise DeadlineExceeded(f"deadline exceeded before {len(items)} {self.kind}(s) could be queued")
        self.check_capacity(len(items))
        if self._task is None:
            self._task = loop.create_task(self._worker(), name=f"encoder-{self.kind}-batcher")
        now = loop.time()
        pending = [_Pending[T, R](item, loop.create_future(), now, deadline) for item in items]
        for p in pending:
            self._queue.put_nowait(p)
        # return_exceptions: when one batch fails, the other futures' errors must still be retrieved.
        results = await asyncio.gather(*(p.future for p in pending), return_exceptions=True)
        for r in results:
            if isinstance(r, BaseException):
                raise r
        return results  # type: ignore[return-value]

    def _usable(self, p: _Pending[T, R], now: float) -> bool:
        """False for items whose caller went away or whose deadline passed while they queued."""
        if p.future.done():
            return False
        if p.deadline is not None and p.deadline <= now:
            self.stats.expired += 1
            p.future.set_exception(DeadlineExceeded(f"deadline exceeded while the {self.kind} waited in the queue"))
            return False
        return True

    async def _collect(self) -> list[_Pending[T, R]]:
        loop = asyncio.get_running_loop()
        batch: list[_Pending[T, R]] = []
        while not batch:
            first = await self._queue.get()
            if self._usable(first, loop.time()):
                batch.append(first)
        # The window opens when the oldest item arrived, not when the worker got to it: after a long batch,
        # items that already waited that long go straight to the model with whatever queued behind them.
        close_at = batch[0].enqueued + self.max_wait_s
        while len(batch) < self.max_batch:
            try:
                p = self._queue.get_nowait()
            except asyncio.QueueEmpty:
                remaining = close_at - loop.time()
                if remaining <= 0:
                    break
                try:
                    p = await asyncio.wait_for(self._queue.get(), remaining)
                except TimeoutError:
                    break
            if self._usable(p, loop.time()):
                batch.append(p)
        return batch

    async def _worker(self) -> None:
        try:
            while True:
                # Wait for a free worker first: items keep queueing meanwhile and form the next batch.
                await self._free.acquire()
                try:
                    batch = await self._collect()
                except BaseException:
                    self._free.release()
                    raise
                task = asyncio.get_running_loop().create_task(self._run(batch))
                self._running.add(task)
                task.add_done_callback(self._running.discard)
        finally:
            for task in list(self._running):
                task.cancel()
            if self._running:
                await asyncio.gather(*self._running, return_exceptions=True)

    async def _run(self, batch: list[_Pending[T, R]]) -> None:
        loop = asyncio.get_running_loop()
        try:
            # Deadlines may have passed during the collection window.
            batch = [p for p in batch if self._usable(p, loop.time())]
            if not batch:
                return
            now = loop.time()
            for p in batch:
                metrics.QUEUE_SECONDS.labels(self.kind).observe(now - p.enqueued)
            started = time.perf_counter()
            metrics.BATCH_SIZE.labels(self.kind).observe(len(batch))
            try:
                results = await loop.run_in_executor(self._executor, self._run_batch, [p.item for p in batch])
                if len(results) != len(batch):
                    raise RuntimeError(f"{self.kind} model returned {len(results)} results for {len(batch)} items")
            except asyncio.CancelledError:
                for p in batch:
                    if not p.future.done():
                        p.future.set_exception(Unavailable("the encoder is shutting down"))
                raise
            except Exception as exc:
                log.error("%s batch of %d failed", self.kind, len(batch), exc_info=exc)
                for p in batch:
                    if not p.future.done():
                        p.future.set_exception(exc)
                return
            metrics.INFERENCE_SECONDS.labels(self.kind).observe(time.perf_counter() - started)
            metrics.ITEMS.labels(self.kind).inc(len(batch))
            self.stats.batches += 1
            self.stats.items += len(batch)
            self.stats.largest = max(self.stats.largest, len(batch))
            for p, r in zip(batch, results, strict=True):
                if not p.future.done():
                    p.future.set_result(r)
        finally:
            self._free.release()

    async def close(self) -> None:
        """Stop the worker; anything still queued fails with UNAVAILABLE."""
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        while not self._queue.empty():
            p = self._queue.get_nowait()
            if not p.future.done():
                p.future.set_exception(Unavailable("the encoder is shutting down"))
        self._executor.shutdown(wait=True)
