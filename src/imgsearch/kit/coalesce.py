"""Coalesce concurrent calls to one peer into batched calls, with no waiting window (adaptive batching)."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

import grpc

from imgsearch.kit.errors import ImgsearchError
from imgsearch.kit.peers import PeerError

T = TypeVar("T")
R = TypeVar("R")

# Sends a batch with the given timeout (seconds); one result or one error per item, in order. An
# ImgsearchError raised instead fails every item of the batch.
Send = Callable[[list[T], float], Awaitable[Sequence["R | ImgsearchError"]]]


@dataclass
class _Pending(Generic[T, R]):
    item: T
    future: asyncio.Future[R]
    deadline: float
    timer: asyncio.TimerHandle | None = None


class Coalescer(Generic[T, R]):
    """Calls to one peer, batched while the peer is busy.

    A call goes out on the event loop's next turn when fewer than `max_inflight` batches are in flight, so a lone
    caller pays no timer, only that turn; calls made in the same turn leave with it (the queries of one encoder
    batch fanning out to a shard, say, go as one call instead of one call plus a batch of the rest). Calls that
    arrive while the peer is busy queue, and the next free slot sends all of them (up to `max_batch`) as one
    batch. Under load the peer then pays its per-call cost (gRPC, interceptors, logging) once per batch instead
    of once per query, and the batch size follows the load with no timer to tune.

    Each caller keeps its own deadline: a batch is sent with the latest deadline among its items, and an item
    whose own deadline passes first fails alone with DEADLINE_EXCEEDED (the batch goes on for the others).
    """

    def __init__(
        self,
        send: Send[T, R],
        *,
        peer: str,
        max_batch: int = 64,
        max_inflight: int = 2,
        observe: Callable[[int], None] | None = None,
    ) -> None:
        if max_batch < 1 or max_inflight < 1:
            raise ValueError("max_batch and max_inflight must be at least 1")
        self._send = send
        self.peer = peer
        self.max_batch = max_batch
        self.max_inflight = max_inflight
        self._observe = observe
        self._queue: deque[_Pending[T, R]] = deque()
        self._inflight = 0
        # Batches started but not yet taken from the queue (each takes up to max_batch on its first step).
        self._starting = 0
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def queued(self) -> int:
        return len(self._queue)

    @property
    def inflight(self) -> int:
        return self._inflight

    async def call(self, item: T, timeout: float) -> R:
        """The peer's answer for `item`, sent alone or in a batch with concurrent calls."""
        loop = asyncio.get_running_loop()
        pending: _Pending[T, R] = _Pending(item, loop.create_future(), loop.time() + timeout)
        pending.timer = loop.call_at(pending.deadline, self._expire, pending)
        self._queue.append(pending)
        self._pump()
        return await pending.future

    def _expire(self, pending: _Pending[T, R]) -> None:
        if not pending.future.done():
            pending.future.set_exception(
                PeerError(grpc.StatusCode.DEADLINE_EXCEEDED, f"deadline exceeded waiting for {self.peer}")
            )

    def _pump(self) -> None:
        # A started batch takes what is queued when its task first runs, on the loop's next turn.
        while self._inflight < self.max_inflight and len(self._queue) > self._starting * self.max_batch:
            self._inflight += 1
            self._starting += 1
            task = asyncio.get_running_loop().create_task(self._run())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _take(self) -> list[_Pending[T, R]]:
        batch: list[_Pending[T, R]] = []
        while self._queue and len(batch) < self.max_batch:
            pending = self._queue.popleft()
            # Expired or cancelled while queued: nobody waits for its answer any more.
            if not pending.future.done():
                batch.append(pending)
        return batch

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        self._starting -= 1
        batch = self._take()
        try:
            if not batch:
                return
            if self._observe is not None:
                self._observe(len(batch))
            timeout = max(0.001, max(p.deadline for p in batch) - loop.time())
            try:
                results = await self._send([p.item for p in batch], timeout)
            except ImgsearchError as exc:
                results = [exc] * len(batch)
            except asyncio.CancelledError:
                for p in batch:
                    if not p.future.done():
                        p.future.cancel()
                raise
            if len(results) != len(batch):
                raise RuntimeError(f"{self.peer} answered {len(results)} results for {len(batch)} items")
            for p, result in zip(batch, results, strict=True):
                if p.timer is not None:
                    p.timer.cancel()
                if p.future.done():
                    continue
                if isinstance(result, ImgsearchError):
                    p.future.set_exception(result)
                else:
                    p.future.set_result(result)
        except BaseException as exc:
            # A bug (not a peer's answer) must still reach every caller instead of leaving them waiting.
            for p in batch:
                if not p.future.done():
                    p.future.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
        finally:
            self._inflight -= 1
            self._pump()
