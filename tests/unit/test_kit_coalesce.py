"""kit.coalesce: concurrent calls batched while the peer is busy, each with its own result, error and deadline."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from imgsearch.kit.coalesce import Coalescer
from imgsearch.kit.errors import ImgsearchError, InvalidArgument, Unavailable


class FakePeer:
    """Answers x -> x * 10 (a negative x is that item's error) once released; records every batch."""

    def __init__(self, fail_batch: ImgsearchError | None = None) -> None:
        self.batches: list[list[int]] = []
        self.timeouts: list[float] = []
        self.release = asyncio.Event()
        self.fail_batch = fail_batch

    async def send(self, items: list[int], timeout: float) -> list[int | ImgsearchError]:
        self.batches.append(list(items))
        self.timeouts.append(timeout)
        await self.release.wait()
        if self.fail_batch is not None:
            raise self.fail_batch
        return [InvalidArgument(f"item {x} is negative") if x < 0 else x * 10 for x in items]


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_a_lone_call_goes_out_at_once_as_a_batch_of_one() -> None:
    peer = FakePeer()
    peer.release.set()
    sizes: list[int] = []
    c: Coalescer[int, int] = Coalescer(peer.send, peer="the peer", observe=sizes.append)
    assert await c.call(3, 1.0) == 30
    assert peer.batches == [[3]]
    assert sizes == [1]
    assert (c.inflight, c.queued) == (0, 0)


async def test_calls_arriving_while_the_peer_is_busy_go_out_together_each_with_its_own_answer() -> None:
    peer = FakePeer()
    c: Coalescer[int, int] = Coalescer(peer.send, peer="the peer", max_inflight=1)
    first = asyncio.ensure_future(c.call(1, 5.0))
    await settle()
    assert peer.batches == [[1]]
    rest = [asyncio.ensure_future(c.call(x, 5.0)) for x in (2, -3, 4)]
    await settle()
    assert c.queued == 3, "nothing more is sent while the only slot is busy"
    peer.release.set()
    assert await first == 10
    results = await asyncio.gather(*rest, return_exceptions=True)
    assert peer.batches == [[1], [2, -3, 4]]
    assert results[0] == 20 and results[2] == 40
    assert isinstance(results[1], InvalidArgument) and results[1].message == "item -3 is negative"


async def test_batches_respect_max_batch_and_max_inflight() -> None:
    peer = FakePeer()
    c: Coalescer[int, int] = Coalescer(peer.send, peer="the peer", max_batch=3, max_inflight=2)
    calls = [asyncio.ensure_future(c.call(x, 5.0)) for x in range(8)]
    await settle()
    # All eight calls were made in one turn of the loop: the two free slots each took a full batch of what was
    # queued when they started; the rest wait for a slot.
    assert peer.batches == [[0, 1, 2], [3, 4, 5]]
    assert (c.inflight, c.queued) == (2, 2)
    peer.release.set()
    assert await asyncio.gather(*calls) == [x * 10 for x in range(8)]
    assert peer.batches[2:] == [[6, 7]]


async def test_calls_made_in_the_same_turn_leave_together_but_a_later_one_goes_alone() -> None:
    peer = FakePeer()
    peer.release.set()
    c: Coalescer[int, int] = Coalescer(peer.send, peer="the peer", max_inflight=1)

    async def fan_out(items: list[int]) -> list[int]:
        # As the gateway does with the queries of one encoder batch: one task per item, started together.
        return list(await asyncio.gather(*(c.call(x, 5.0) for x in items)))

    assert await fan_out([1, 2, 3]) == [10, 20, 30]
    assert await c.call(4, 5.0) == 40
    assert peer.batches == [[1, 2, 3], [4]]
    assert (c.inflight, c.queued) == (0, 0)


async def test_an_error_for_the_whole_batch_reaches_every_caller_and_the_next_batch_still_goes() -> None:
    peer = FakePeer(fail_batch=Unavailable("index shard s0 is unavailable"))
    c: Coalescer[int, int] = Coalescer(peer.send, peer="the peer", max_inflight=1)
    calls = [asyncio.ensure_future(c.call(x, 5.0)) for x in (1, 2, 3)]
    peer.release.set()
    results = await asyncio.gather(*calls, return_exceptions=True)
    assert all(isinstance(r, Unavailable) for r in results)
    peer.fail_batch = None
    assert await c.call(4, 5.0) == 40


async def test_a_caller_whose_deadline_passes_fails_alone_and_the_batch_gets_the_latest_deadline() -> None:
    peer = FakePeer()
    c: Coalescer[int, int] = Coalescer(peer.send, peer="index shard s1", max_inflight=1)
    busy = asyncio.ensure_future(c.call(0, 5.0))
    await settle()
    short = asyncio.ensure_future(c.call(1, 0.05))
    long = asyncio.ensure_future(c.call(2, 5.0))
    with pytest.raises(ImgsearchError) as info:
        await short
    assert info.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert info.value.message == "deadline exceeded waiting for index shard s1"
    peer.release.set()
    assert (await busy, await long) == (0, 20)
    # The expired call was never sent; the batch carried the remaining deadline of the call that still waited.
    assert peer.batches == [[0], [2]]
    assert 4.0 < peer.timeouts[1] <= 5.0


async def test_a_cancelled_caller_does_not_disturb_the_others() -> None:
    peer = FakePeer()
    c: Coalescer[int, int] = Coalescer(peer.send, peer="the peer", max_inflight=1)
    busy = asyncio.ensure_future(c.call(0, 5.0))
    await settle()
    gone = asyncio.ensure_future(c.call(1, 5.0))
    kept = asyncio.ensure_future(c.call(2, 5.0))
    await settle()
    gone.cancel()
    peer.release.set()
    assert (await busy, await kept) == (0, 20)
    assert gone.cancelled()
    assert peer.batches == [[0], [2]]


def test_limits_must_be_positive() -> None:
    with pytest.raises(ValueError):
        Coalescer(FakePeer().send, peer="p", max_batch=0)
