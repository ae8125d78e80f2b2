"""IndexService over gRPC: parse the request, call the ShardIndex (on a worker thread unless cheap), convert."""

from __future__ import annotations

import asyncio
from typing import Any

from grpc import aio

from imgsearch.api.index.v1 import index_pb2, index_pb2_grpc
from imgsearch.index import convert
from imgsearch.index.core import ShardIndex
from imgsearch.kit.convert import item_error
from imgsearch.kit.errors import ImgsearchError, ResourceExhausted, Unavailable

Context = aio.ServicerContext[Any, Any]
SearchArgs = tuple[Any, ...]

# Get requests of at most this many ids run on the event loop.
INLINE_GET_IDS = 64


class IndexServicer(index_pb2_grpc.IndexServiceServicer):
    """Thin adapter; the shard is attached once it has loaded (health says NOT_SERVING until then)."""

    def __init__(self, shard_name: str) -> None:
        self.shard_name = shard_name
        self.core: ShardIndex | None = None

    def _core(self) -> ShardIndex:
        if self.core is None:
            raise Unavailable(f"index shard {self.shard_name!r} is still loading; retry shortly")
        return self.core

    async def Upsert(self, request: index_pb2.UpsertRequest, context: Context) -> index_pb2.UpsertResponse:
        core = self._core()
        records = convert.record_inputs(request.records)
        results = await asyncio.to_thread(core.upsert, records)
        return index_pb2.UpsertResponse(results=[convert.write_result(r) for r in results])

    async def Delete(self, request: index_pb2.DeleteRequest, context: Context) -> index_pb2.DeleteResponse:
        core = self._core()
        results = await asyncio.to_thread(core.delete, list(request.ids))
        return index_pb2.DeleteResponse(results=[convert.write_result(r) for r in results])

    async def Search(self, request: index_pb2.SearchRequest, context: Context) -> index_pb2.SearchResponse:
        core = self._core()
        args = _search_args(request)
        # Right here when it is microseconds (a thread hop would cost more); otherwise on a worker thread.
        result = core.search_now(*args)
        if result is None:
            result = await asyncio.to_thread(core.search, *args)
        return convert.search_response(result, core.shard)

    async def SearchBatch(
        self, request: index_pb2.SearchBatchRequest, context: Context
    ) -> index_pb2.SearchBatchResponse:
        core = self._core()
        if len(request.searches) > core.settings.max_batch:
            raise ResourceExhausted(
                f"{len(request.searches)} searches in one SearchBatch, at most {core.settings.max_batch} allowed"
            )
        results: dict[int, index_pb2.SearchBatchResult] = {}
        later: list[tuple[int, SearchArgs]] = []
        for i, search in enumerate(request.searches):
            try:
                args = _search_args(search)
                found = core.search_now(*args)
            except ImgsearchError as exc:
                results[i] = index_pb2.SearchBatchResult(error=item_error(exc))
                continue
            if found is None:
                later.append((i, args))
            else:
                results[i] = index_pb2.SearchBatchResult(response=convert.search_response(found, core.shard))
        if later:
            # The searches that cannot run on the event loop share one worker-thread hop.
            for i, result in await asyncio.to_thread(_search_all, core, later):
                results[i] = result
        return index_pb2.SearchBatchResponse(
            results=[results[i] for i in range(len(request.searches))], shard=core.shard
        )

    async def Get(self, request: index_pb2.GetRequest, context: Context) -> index_pb2.GetResponse:
        core = self._core()
        ids = list(request.ids)
        # A few rows from SQLite (a WAL reader never waits for the writer): cheaper here than a thread hop.
        if len(ids) <= INLINE_GET_IDS:
            return self._get(core, ids, request.include_vectors, request.include_thumbnails)
        return await asyncio.to_thread(self._get, core, ids, request.include_vectors, request.include_thumbnails)

    @staticmethod
    def _get(core: ShardIndex, ids: list[str], vectors: bool, thumbnails: bool) -> index_pb2.GetResponse:
        found, missing = core.get(ids, vectors)
        records = [convert.record(r) for r in found]
        if thumbnails and records:
            thumbs = core.thumbnails([r.id for r in records])
            for r in records:
                r.thumbnail = thumbs.get(r.id, b"")
        return index_pb2.GetResponse(records=records, missing_ids=missing)

    async def Scan(self, request: index_pb2.ScanRequest, context: Context) -> index_pb2.ScanResponse:
        core = self._core()
        page = await asyncio.to_thread(core.scan, request.page_size, request.page_token, request.skip_semantic_head)
        return convert.scan_response(page)

    async def SetSemantic(
        self, request: index_pb2.SetSemanticRequest, context: Context
    ) -> index_pb2.SetSemanticResponse:
        core = self._core()
        updates = [convert.semantic_input(u) for u in request.updates]
        results = await asyncio.to_thread(core.set_semantic, updates)
        return index_pb2.SetSemanticResponse(results=[convert.write_result(r) for r in results])

    async def Stats(self, request: index_pb2.StatsRequest, context: Context) -> index_pb2.StatsResponse:
        stats = await asyncio.to_thread(self._core().stats)
        return convert.stats_response(stats)

    async def GetHeadState(
        self, request: index_pb2.GetHeadStateRequest, context: Context
    ) -> index_pb2.GetHeadStateResponse:
        state = await asyncio.to_thread(self._core().head_state)
        return convert.get_head_state_response(state)

    async def SetHeadConfig(
        self, request: index_pb2.SetHeadConfigRequest, context: Context
    ) -> index_pb2.SetHeadConfigResponse:
        core = self._core()
        state = await asyncio.to_thread(core.set_head_config, convert.head_config(request.config))
        return convert.set_head_config_response(state)


def _search_args(request: index_pb2.SearchRequest) -> SearchArgs:
    """ShardIndex.search's arguments from one request (INVALID_ARGUMENT for a malformed one)."""
    return (
        convert.space(request.space),
        convert.query(request),
        request.k,
        list(request.exclude_ids),
        request.semantic_head,
        convert.search_filter(request),
        convert.min_score(request),
        convert.cursor(request),
    )


def _search_all(
    core: ShardIndex, searches: list[tuple[int, SearchArgs]]
) -> list[tuple[int, index_pb2.SearchBatchResult]]:
    """Run searches one after another on this (worker) thread; each failure stays with its search."""
    out = []
    for i, args in searches:
        try:
            result = index_pb2.SearchBatchResult(response=convert.search_response(core.search(*args), core.shard))
        except ImgsearchError as exc:
            result = index_pb2.SearchBatchResult(error=item_error(exc))
        out.append((i, result))
    return out
