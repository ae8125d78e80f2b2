"""The SDK's sync and async clients against an in-process fake gateway (a real grpc.aio server, no mocks)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest

from imgsearch.api.common.v1 import common_pb2
from imgsearch.api.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from imgsearch.client import (
    DEFAULT_K,
    AddressError,
    AsyncGatewayClient,
    GatewayClient,
    ImageToAdd,
    SearchFilter,
    StoredImage,
    StoredImages,
    TagResults,
    check_address,
)

MAX_K = 1000


class FakeGateway(gateway_pb2_grpc.GatewayServiceServicer):
    """A small in-memory GatewayService: enough behaviour to check what clients send and how they read answers."""

    def __init__(self) -> None:
        self.images: dict[str, gateway_pb2.StoredImage] = {}
        self.vocabulary: dict[str, bool] = {"cat": True, "dog": True, "kite": True}
        self.calls: list[tuple[str, Any, dict[str, str]]] = []

    def _record(self, method: str, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        self.calls.append((method, request, {str(k): str(v) for k, v in context.invocation_metadata() or ()}))

    def last(self, method: str) -> tuple[Any, dict[str, str]]:
        _, request, metadata = next(c for c in reversed(self.calls) if c[0] == method)
        return request, metadata

    @staticmethod
    async def _check_k(k: int, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        if not 1 <= k <= MAX_K:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"k must be between 1 and {MAX_K}, got {k}")

    @staticmethod
    async def _check_image(image: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        if not image.startswith(b"\x89PNG"):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "image is empty or not a decodable image")

    def _hits(self, k: int) -> list[common_pb2.SearchHit]:
        return [
            common_pb2.SearchHit(
                id=i.id, score=1.0 - n / 10, metadata=i.metadata, source_name=i.source_name, shard="s0"
            )
            for n, i in enumerate(list(self.images.values())[:k])
        ]

    def _add_one(
        self, req: Any, position: int, context: grpc.aio.ServicerContext[Any, Any]
    ) -> gateway_pb2.AddImageResult:
        # Both add RPCs are recorded as "AddImages": the tests check what was sent, not which of the two.
        self._record("AddImages", req, context)
        image_id = req.id or f"hash{position}"
        if not req.image.startswith(b"\x89PNG"):
            err = common_pb2.ItemError(code=grpc.StatusCode.INVALID_ARGUMENT.value[0], message="not an image")
            return gateway_pb2.AddImageResult(position=position, id=image_id, error=err)
        created = image_id not in self.images
        self.images[image_id] = gateway_pb2.StoredImage(
            id=image_id, metadata=req.metadata, source_name=req.source_name, created_unix_ms=1, shard="s0"
        )
        return gateway_pb2.AddImageResult(position=position, id=image_id, created=created)

    async def AddImages(
        self, request_iterator: Any, context: grpc.aio.ServicerContext[Any, Any]
    ) -> gateway_pb2.AddImagesResponse:
        results = []
        position = 0
        async for req in request_iterator:
            results.append(self._add_one(req, position, context))
            position += 1
        failed = sum(r.HasField("error") for r in results)
        return gateway_pb2.AddImagesResponse(results=results, added=len(results) - failed, failed=failed)

    async def AddImagesStream(
        self, request_iterator: Any, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[gateway_pb2.AddImagesStreamResponse]:
        position = 0
        async for req in request_iterator:
            # One result per message as soon as it is stored, as the real gateway streams them.
            yield gateway_pb2.AddImagesStreamResponse(results=[self._add_one(req, position, context)])
            position += 1

    async def DeleteImages(
        self, request: gateway_pb2.DeleteImagesRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> gateway_pb2.DeleteImagesResponse:
        self._record("DeleteImages", request, context)
        if not request.ids:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "no ids given")
        results = []
        for image_id in request.ids:
            if self.images.pop(image_id, None) is None:
                err = common_pb2.ItemError(code=grpc.StatusCode.NOT_FOUND.value[0], message=f"{image_id} is not stored")
                results.append(gateway_pb2.DeleteResult(id=image_id, error=err))
            else:
                results.append(gateway_pb2.DeleteResult(id=image_id))
        deleted = sum(not r.HasField("error") for r in results)
        return gateway_pb2.DeleteImagesResponse(results=results, deleted=deleted)

    async def GetImages(
        self, request: gateway_pb2.GetImagesRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> gateway_pb2.GetImagesResponse:
        self._record("GetImages", request, context)
        found = [self.images[i] for i in request.ids if i in self.images]
        missing = [i for i in request.ids if i not in self.images]
        return gateway_pb2.GetImagesResponse(images=found, missing_ids=missing)

    async def SearchByText(
        self, request: gateway_pb2.SearchByTextRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> gateway_pb2.SearchByTextResponse:
        self._record("SearchByText", request, context)
        await self._check_k(request.k, context)
        meta = gateway_pb2.SearchMeta(space=common_pb2.SPACE_SEMANTIC, head="default@1", shards_total=1)
        return gateway_pb2.SearchByTextResponse(hits=self._hits(request.k), meta=meta)

    async def SearchByImage(
        self, request: gateway_pb2.SearchByImageRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> gateway_pb2.SearchByImageResponse:
        self._record("SearchByImage", request, context)
        await self._check_k(request.k, context)
        await self._check_image(request.image, context)
        meta = gateway_pb2.SearchMeta(space=request.space or common_pb2.SPACE_VISUAL, shards_total=2)
        meta.partial = True
        meta.failed_shards.append("s1")
        return gateway_pb2.SearchByImageResponse(hits=self._hits(request.k), meta=meta)

    async def CountImages(
        self, request: gateway_pb2.CountImagesRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> gateway_pb2.CountImagesResponse:
        self._record("CountImages", request, context)
        n = len(self.images)
        return gateway_pb2.CountImagesResponse(total=n, shards=[gateway_pb2.ShardCount(shard="s0", images=n)])

    async def SearchByTexts(
        self, request: gateway_pb2.SearchByTextsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> gateway_pb2.SearchByTextsResponse:
        self._record("SearchByTexts", request, context)
        meta = gateway_pb2.SearchMeta(space=common_pb2.SPACE_SEMANTIC, shards_total=1)
        results = []
        for q in request.queries:
            if q.strip():
                results.append(gateway_pb2.TextSearchResult(query=q, hits=self._hits(request.k), meta=meta))
            else:
                error = common_pb2.ItemError(code=grpc.StatusCode.INVALID_ARGUMENT.value[0], message="query is empty")
                results.append(gateway_pb2.TextSearchResult(query=q, error=error))
        return gateway_pb2.SearchByTextsResponse(results=results)

    async def SearchByExamples(
        self, request: gateway_pb2.SearchByExamplesRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> gateway_pb2.SearchByExamplesResponse:
        self._record("SearchByExamples", request, context)
        examples = {*request.positive_ids, *request.negative_ids}
        meta = gateway_pb2.SearchMeta(space=request.space or common_pb2.SPACE_VISUAL, shards_total=1)
        hits = [h for h in self._hits(MAX_K) if h.id not in examples][: request.k]
        return gateway_pb2.SearchByExamplesResponse(hits=hits, meta=meta, next_page_token="next" if hits else "")

    async def SearchById(
        self, request: gateway_pb2.SearchByIdRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> gateway_pb2.SearchByIdResponse:
        self._record("SearchById", request, context)
        await self._check_k(request.k, context)
        if request.id not in self.images:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"image {request.id!r} is not stored")
        meta = gateway_pb2.SearchMeta(space=request.space or common_pb2.SPACE_VISUAL, shards_total=1)
        hits = [h for h in self._hits(MAX_K) if request.include_self or h.id != request.id][: request.k]
        return gateway_pb2.SearchByIdResponse(hits=hits, meta=meta)

    async def TagImage(
        self, request: gateway_pb2.TagImageRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> gateway_pb2.TagImageResponse:
        self._record("TagImage", request, context)
        await self._check_k(request.k, context)
        await self._check_image(request.image, context)
        tags = [
            common_pb2.TagScore(tag=name, score=0.9 - n / 10, seen=seen)
            for n, (name, seen) in enumerate(self.vocabulary.items())
        ]
        return gateway_pb2.TagImageResponse(
            tags=tags[: request.k], head="default@1", vocabulary_size=len(self.vocabulary)
        )

    async def AddTags(
        self, request: gateway_pb2.AddTagsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> gateway_pb2.AddTagsResponse:
        self._record("AddTags", request, context)
        results = []
        for tag in request.tags:
            if not tag.strip():
                err = common_pb2.ItemError(code=grpc.StatusCode.INVALID_ARGUMENT.value[0], message="tag is empty")
                results.append(common_pb2.TagResult(tag=tag, error=err))
                continue
            results.append(common_pb2.TagResult(tag=tag, changed=tag not in self.vocabulary))
            self.vocabulary.setdefault(tag, False)
        return gateway_pb2.AddTagsResponse(results=results)

    async def RemoveTags(
        self, request: gateway_pb2.RemoveTagsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> gateway_pb2.RemoveTagsResponse:
        self._record("RemoveTags", request, context)
        results = [common_pb2.TagResult(tag=t, changed=self.vocabulary.pop(t, None) is not None) for t in request.tags]
        return gateway_pb2.RemoveTagsResponse(results=results)

    async def ListTags(
        self, request: gateway_pb2.ListTagsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> gateway_pb2.ListTagsResponse:
        self._record("ListTags", request, context)
        wanted = {common_pb2.TAG_FILTER_SEEN: {True}, common_pb2.TAG_FILTER_UNSEEN: {False}}.get(
            request.filter, {True, False}
        )
        tags = [common_pb2.Tag(name=n, seen=s, added_unix_ms=5) for n, s in self.vocabulary.items() if s in wanted]
        start = int(request.page_token or 0)
        size = request.page_size or 100
        page = tags[start : start + size]
        token = str(start + size) if start + size < len(tags) else ""
        return gateway_pb2.ListTagsResponse(tags=page, next_page_token=token, total=len(tags))

    async def ListHeads(
        self, request: gateway_pb2.ListHeadsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> gateway_pb2.ListHeadsResponse:
        self._record("ListHeads", request, context)
        head = gateway_pb2.HeadInfo(name="default", version="1", kind="linear", active=True, metrics={"r@10": 0.67})
        status = gateway_pb2.HeadSwitchStatus(active="default@1", epoch=3)
        return gateway_pb2.ListHeadsResponse(heads=[head], active="default@1", status=status)

    async def ActivateHead(
        self, request: gateway_pb2.ActivateHeadRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> gateway_pb2.ActivateHeadResponse:
        self._record("ActivateHead", request, context)
        if request.head != "conse":
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no head {request.head!r}")
        head = gateway_pb2.HeadInfo(name="conse", version="1", kind="conse", active=True)
        progress = gateway_pb2.ShardHeadProgress(shard="s0", images=len(self.images), done=0, reachable=True)
        status = gateway_pb2.HeadSwitchStatus(active="default@1", building="conse@1", epoch=4, shards=[progress])
        return gateway_pb2.ActivateHeadResponse(head=head, previous="default@1", status=status)


@contextmanager
def serve(servicer: FakeGateway) -> Iterator[str]:
    """Run the fake on its own event loop in a thread, so blocking clients can call it from the test thread."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    async def start() -> tuple[grpc.aio.Server, int]:
        server = grpc.aio.server()
        gateway_pb2_grpc.add_GatewayServiceServicer_to_server(servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        return server, port

    server, port = asyncio.run_coroutine_threadsafe(start(), loop).result(10)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        asyncio.run_coroutine_threadsafe(server.stop(None), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


PNG = b"\x89PNG fake image bytes"


@pytest.fixture()
def fake() -> FakeGateway:
    return FakeGateway()


@pytest.fixture()
def address(fake: FakeGateway) -> Iterator[str]:
    with serve(fake) as addr:
        yield addr


@pytest.fixture()
def photo(tmp_path: Path) -> Path:
    path = tmp_path / "cat.png"
    path.write_bytes(PNG)
    return path


async def test_async_client_covers_every_call(fake: FakeGateway, address: str, photo: Path) -> None:
    async with AsyncGatewayClient(address, token="s3cret") as client:
        outcomes = await client.add_images([ImageToAdd.from_path(str(photo), "cat", {"album": "x"})])
        assert outcomes[0].ok and outcomes[0].changed and outcomes[0].id == "cat"
        assert fake.last("AddImages")[1]["authorization"] == "Bearer s3cret"

        async def more() -> AsyncIterator[ImageToAdd]:
            yield ImageToAdd(PNG, "dog")
            yield ImageToAdd(b"junk", "bad")

        streamed = await client.add_images(more())
        assert [(o.id, o.ok, o.code, o.position) for o in streamed] == [
            ("dog", True, None, 0),
            ("bad", False, "INVALID_ARGUMENT", 1),
        ]

        got = await client.get_images(["cat", "nope"])
        assert got == StoredImages([StoredImage("cat", {"album": "x"}, str(photo), 1, "s0")], ["nope"], False)

        res = await client.search_text("a cat")
        assert fake.last("SearchByText")[0].k == DEFAULT_K, "unset k means the default"
        assert res.space == "semantic" and res.head == "default@1" and [h.id for h in res.hits] == ["cat", "dog"]
        by_image = await client.search_image(photo, k=1, space="semantic")
        assert by_image.partial and by_image.failed_shards == ["s1"] and by_image.space == "semantic"
        similar = await client.similar("cat")
        assert [h.id for h in similar.hits] == ["dog"]

        tags = await client.tag(photo, k=2)
        assert isinstance(tags, TagResults) and [t.tag for t in tags.tags] == ["cat", "dog"]
        assert fake.last("TagImage")[0].image == PNG
        added = await client.add_tags(["feline", " "])
        assert [(o.id, o.ok, o.changed, o.position) for o in added] == [
            ("feline", True, True, 0),
            (" ", False, False, 1),
        ]
        assert [t.name for t in [t async for t in client.list_tags("unseen", page_size=1)]] == ["feline"]
        assert [t.name async for t in client.list_tags(page_size=2)] == ["cat", "dog", "kite", "feline"]
        assert (await client.count_tags()).total == 4 and (await client.count_tags("seen")).total == 3
        assert (await client.remove_tags("feline"))[0].changed

        heads = await client.list_heads()
        assert heads[0].active and heads[0].metrics == {"r@10": pytest.approx(0.67)}
        assert (await client.head_status()).active == "default@1"
        switch = await client.activate_head("conse")
        assert switch.head.name == "conse" and switch.previous == "default@1" and switch.status is not None
        assert switch.status.building == "conse@1" and switch.status.shards[0].images == 2

        deleted, partial = await client.delete_images(["cat", "ghost"])
        assert [o.ok for o in deleted] == [True, False] and deleted[1].code == "NOT_FOUND" and not partial

        with pytest.raises(grpc.aio.AioRpcError) as info:
            await client.search_text("x", k=0)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_sync_client_matches_the_async_one(fake: FakeGateway, address: str, photo: Path) -> None:
    with GatewayClient(address) as client:
        assert client.add_images([ImageToAdd.from_path(photo, "cat")])[0].ok
        assert client.tag(str(photo)).tags and fake.last("TagImage")[0].k == DEFAULT_K
        assert client.search_image(PNG).hits[0].id == "cat" and fake.last("SearchByImage")[0].k == DEFAULT_K
        assert client.similar("cat", include_self=True).hits[0].id == "cat"
        assert fake.last("SearchById")[0].k == DEFAULT_K
        assert client.get_images("cat").images[0].source_name == str(photo), "a lone id is one id"
        assert "authorization" not in fake.last("GetImages")[1]
        assert client.count_tags("unseen").total == 0
        with pytest.raises(grpc.RpcError) as info:
            client.similar("ghost")
        assert info.value.code() == grpc.StatusCode.NOT_FOUND


def test_both_clients_expose_the_same_methods() -> None:
    public = {n for n in dir(GatewayClient) if not n.startswith("_") and n not in ("close",)}
    assert public <= set(dir(AsyncGatewayClient)), public - set(dir(AsyncGatewayClient))


@pytest.mark.parametrize(
    ("address", "words"),
    [
        ("127.0.0.1", "has no port"),
        ("gateway.example.com", "has no port"),
        ("127.0.0.1:0", "outside 1..65535"),
        ("127.0.0.1:99999", "outside 1..65535"),
        ("http://127.0.0.1:50050", "not host:port"),
        ("", "not host:port"),
    ],
)
def test_addresses_without_a_usable_port_are_refused(address: str, words: str) -> None:
    with pytest.raises(AddressError, match=words):
        check_address(address)
    with pytest.raises(AddressError):
        GatewayClient(address or " ")


@pytest.mark.parametrize("address", ["127.0.0.1:50050", "localhost:1", "[::1]:50050", "dns:///gw:443", "unix:/tmp/s"])
def test_dialable_addresses_pass(address: str) -> None:
    assert check_address(f" {address} ") == address


async def test_search_options_batches_and_examples_reach_the_wire(fake: FakeGateway, address: str) -> None:
    f = SearchFilter(metadata={"album": ["a", "b"], "owner": "kim"}, created_after=5, min_score=0.25)
    async with AsyncGatewayClient(address) as client:
        await client.search_text("dogs", filter=f, page_token="tok")
        batch = await client.search_texts(["dogs", "  "], k=3)
        more = await client.search_by_examples(["x"], ["y"], text="red", space="semantic")
    sent, _ = fake.last("SearchByText")
    assert [(t.key, list(t.values)) for t in sent.options.filter] == [("album", ["a", "b"]), ("owner", ["kim"])]
    assert sent.options.created_after_unix_ms == 5 and sent.options.min_score == pytest.approx(0.25)
    assert sent.options.page_token == "tok" and sent.k == 10
    assert batch[0].results is not None and batch[1].results is None and batch[1].code == "INVALID_ARGUMENT"
    examples, _ = fake.last("SearchByExamples")
    assert list(examples.positive_ids) == ["x"] and list(examples.negative_ids) == ["y"] and examples.text == "red"
    assert examples.space == common_pb2.SPACE_SEMANTIC and more.space == "semantic"
