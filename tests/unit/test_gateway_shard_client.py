"""ShardClient's batching over an in-memory fake of the index stub: batches, item errors, an older shard."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import numpy as np
import pytest

from imgsearch.api.common.v1 import common_pb2
from imgsearch.api.index.v1 import index_pb2
from imgsearch.gateway.peers import Coalescing, ShardClient
from imgsearch.kit.convert import item_error
from imgsearch.kit.errors import ImgsearchError, InvalidArgument
from imgsearch.kit.peers import PeerError


class FakeIndexStub:
    """Answers a search with one hit named after its k (k = 0 is that search's error); Gets by id."""

    def __init__(self, batch: bool = True) -> None:
        self.batch = batch
        self.calls: list[tuple[str, int]] = []
        self.gate = asyncio.Event()
        self.gate.set()

    @staticmethod
    def answer(req: index_pb2.SearchRequest) -> index_pb2.SearchResponse:
        return index_pb2.SearchResponse(hits=[common_pb2.SearchHit(id=f"k{req.k}", score=0.5)], shard="s")

    async def Search(self, req: index_pb2.SearchRequest, timeout: float) -> index_pb2.SearchResponse:
        self.calls.append(("Search", 1))
        await self.gate.wait()
        if req.k == 0:
            raise PeerError(grpc.StatusCode.INVALID_ARGUMENT, "index shard s: k must be at least 1")
        return self.answer(req)

    async def SearchBatch(self, req: index_pb2.SearchBatchRequest, timeout: float) -> index_pb2.SearchBatchResponse:
        if not self.batch:
            raise PeerError(grpc.StatusCode.UNIMPLEMENTED, "index shard s: Method not found!")
        self.calls.append(("SearchBatch", len(req.searches)))
        await self.gate.wait()
        return index_pb2.SearchBatchResponse(
            results=[
                index_pb2.SearchBatchResult(error=item_error(InvalidArgument("k must be at least 1")))
                if r.k == 0
                else index_pb2.SearchBatchResult(response=self.answer(r))
                for r in req.searches
            ]
        )

    async def Get(self, req: index_pb2.GetRequest, timeout: float) -> index_pb2.GetResponse:
        self.calls.append(("Get", len(req.ids)))
        await self.gate.wait()
        held = [i for i in req.ids if not i.startswith("missing")]
        records = [
            index_pb2.Record(id=i, visual=common_pb2.FloatVector(values=[1.0, 0.0]), metadata={"n": i}) for i in held
        ]
        return index_pb2.GetResponse(records=records, missing_ids=[i for i in req.ids if i not in held])


class NoChannel:
    """Enough of a channel for the generated stub's constructor; the fake stub answers instead."""

    def __getattr__(self, name: str) -> Any:
        return lambda *args, **kwargs: None


ONE_IN_FLIGHT = Coalescing(max_inflight=1)


def client(stub: FakeIndexStub, coalescing: Coalescing | None = ONE_IN_FLIGHT) -> ShardClient:
    c = ShardClient("s", "127.0.0.1:1", NoChannel(), coalescing)  # type: ignore[arg-type]
    c.stub = stub  # type: ignore[assignment]
    return c


async def searches(c: ShardClient, ks: list[int]) -> list[Any]:
    q = np.ones(2, np.float32)
    return await asyncio.gather(
        *(c.search(common_pb2.SPACE_VISUAL, q, k, [], "", 5.0) for k in ks), return_exceptions=True
    )


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def concurrent(stub: FakeIndexStub, c: ShardClient, ks: list[int]) -> list[Any]:
    """The first search finds the shard idle and goes out; the rest arrive while it is busy."""
    stub.gate.clear()
    first = asyncio.ensure_future(searches(c, ks[:1]))
    await settle()
    rest = asyncio.ensure_future(searches(c, ks[1:]))
    await settle()
    stub.gate.set()
    return [*(await first), *(await rest)]


async def test_searches_made_together_leave_as_one_search_batch() -> None:
    stub = FakeIndexStub()
    results = await searches(client(stub), [1, 2, 3])
    assert stub.calls == [("SearchBatch", 3)]
    assert [r[0].id for r in results] == ["k1", "k2", "k3"]


async def test_searches_that_arrive_while_the_shard_is_busy_share_one_search_batch() -> None:
    stub = FakeIndexStub()
    results = await concurrent(stub, client(stub), [1, 2, 0, 3])
    assert stub.calls == [("Search", 1), ("SearchBatch", 3)]
    assert [r[0].id for r in (results[0], results[1], results[3])] == ["k1", "k2", "k3"]
    assert isinstance(results[2], ImgsearchError)
    assert results[2].code == grpc.StatusCode.INVALID_ARGUMENT
    assert results[2].message == "index shard s: k must be at least 1"


async def test_a_shard_without_search_batch_gets_single_searches_from_then_on() -> None:
    stub = FakeIndexStub(batch=False)
    c = client(stub)
    results = await concurrent(stub, c, [1, 2, 3])
    assert [r[0].id for r in results] == ["k1", "k2", "k3"]
    assert not c.batch_supported
    assert stub.calls == [("Search", 1), ("Search", 1), ("Search", 1)]


async def test_coalescing_off_sends_every_search_alone() -> None:
    stub = FakeIndexStub()
    results = await concurrent(stub, client(stub, Coalescing(max_batch=1)), [1, 2, 3])
    assert [r[0].id for r in results] == ["k1", "k2", "k3"]
    assert stub.calls == [("Search", 1)] * 3


async def test_single_id_gets_with_vectors_share_one_get_and_each_caller_sees_only_its_own() -> None:
    stub = FakeIndexStub()
    c = client(stub)
    stub.gate.clear()
    first = asyncio.ensure_future(c.get(["a"], True, 5.0))
    await settle()
    task = asyncio.ensure_future(asyncio.gather(*(c.get([i], True, 5.0) for i in ("b", "missing-1", "b"))))
    await settle()
    stub.gate.set()
    results = [await first, *(await task)]
    assert stub.calls == [("Get", 1), ("Get", 2)], "the duplicate id is asked for once"
    assert [[r.id for r in found] for found, _ in results] == [["a"], ["b"], [], ["b"]]
    assert [missing for _, missing in results] == [[], [], ["missing-1"], []]
    assert results[1][0][0].visual is not None and results[1][0][0].metadata == {"n": "b"}
    # Several ids, or no vectors: one Get of its own, as before.
    found, missing = await c.get(["a", "missing-2"], False, 5.0)
    assert ([r.id for r in found], missing, found[0].visual) == (["a"], ["missing-2"], None)
    assert stub.calls[-1] == ("Get", 2)


@pytest.mark.parametrize("inflight", [1, 2])
async def test_each_search_gets_the_answer_to_its_own_request(inflight: int) -> None:
    stub = FakeIndexStub()
    ks = list(range(1, 41))
    results = await concurrent(stub, client(stub, Coalescing(max_batch=8, max_inflight=inflight)), ks)
    assert [r[0].id for r in results] == [f"k{k}" for k in ks]
    assert max(n for name, n in stub.calls if name == "SearchBatch") == 8
