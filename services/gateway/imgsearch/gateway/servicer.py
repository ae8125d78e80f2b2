"""Thin gRPC layer of the public gateway API: parse, call the Gateway core, convert."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from grpc import aio

from imgsearch.api.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from imgsearch.gateway import convert, metrics
from imgsearch.gateway.core import Gateway
from imgsearch.gateway.http import HttpServer
from imgsearch.gateway.peers import Coalescing, CoalescingEncoder, ShardClient, TaggerClient
from imgsearch.gateway.settings import GatewaySettings
from imgsearch.kit.auth import BearerTokenInterceptor, TokenFileError, auth_interceptor
from imgsearch.kit.encoder_client import EncoderClient
from imgsearch.kit.errors import InvalidArgument
from imgsearch.kit.peers import peer_channel, timeout_for
from imgsearch.kit.server import ServiceApp, methods_of
from imgsearch.kit.settings import load_settings

Ctx = aio.ServicerContext[Any, Any]
_SERVICE = gateway_pb2.DESCRIPTOR.services_by_name["GatewayService"]
# RPCs that change state: they always need a bearer token when authentication is on.
WRITE_METHODS = frozenset(
    f"/{_SERVICE.full_name}/{m}"
    for m in ("AddImages", "AddImagesStream", "DeleteImages", "AddTags", "RemoveTags", "ActivateHead")
)


class GatewayServicer(gateway_pb2_grpc.GatewayServiceServicer):
    """GatewayService over a Gateway core."""

    def __init__(self, gateway: Gateway) -> None:
        self.gw = gateway
        self.default_timeout = gateway.settings.peer_timeout_seconds

    def _timeout(self, context: Ctx) -> float:
        return timeout_for(context, self.default_timeout)

    async def AddImages(
        self, request_iterator: AsyncIterator[gateway_pb2.AddImagesRequest], context: Ctx
    ) -> gateway_pb2.AddImagesResponse:
        results = await self.gw.add_images(convert.new_images(request_iterator), lambda: self._timeout(context))
        return convert.add_response(results)

    async def AddImagesStream(
        self, request_iterator: AsyncIterator[gateway_pb2.AddImagesStreamRequest], context: Ctx
    ) -> AsyncIterator[gateway_pb2.AddImagesStreamResponse]:
        # One message per stored (or failed) batch, sent while the caller is still streaming images in.
        async for done in self.gw.add_images_stream(
            convert.new_images(request_iterator), lambda: self._timeout(context)
        ):
            yield convert.add_stream_response(done)

    async def DeleteImages(
        self, request: gateway_pb2.DeleteImagesRequest, context: Ctx
    ) -> gateway_pb2.DeleteImagesResponse:
        outcomes, partial = await self.gw.delete_images(list(request.ids), self._timeout(context))
        return convert.delete_response(outcomes, partial)

    async def GetImages(self, request: gateway_pb2.GetImagesRequest, context: Ctx) -> gateway_pb2.GetImagesResponse:
        records, missing, partial = await self.gw.get_images(
            list(request.ids), self._timeout(context), include_thumbnails=request.include_thumbnails
        )
        return gateway_pb2.GetImagesResponse(
            images=convert.stored_images(records), missing_ids=missing, partial=partial
        )

    async def CountImages(
        self, request: gateway_pb2.CountImagesRequest, context: Ctx
    ) -> gateway_pb2.CountImagesResponse:
        counts, failed = await self.gw.count_images(self._timeout(context))
        return gateway_pb2.CountImagesResponse(
            total=sum(counts.values()),
            shards=[gateway_pb2.ShardCount(shard=name, images=n) for name, n in counts.items()],
            partial=bool(failed),
            failed_shards=failed,
        )

    async def SearchByImage(
        self, request: gateway_pb2.SearchByImageRequest, context: Ctx
    ) -> gateway_pb2.SearchByImageResponse:
        result = await self.gw.search_by_image(
            request.image, request.k, request.space, self._timeout(context), convert.search_options(request.options)
        )
        return gateway_pb2.SearchByImageResponse(
            hits=convert.hits(result), meta=convert.meta(result), next_page_token=result.next_page_token
        )

    async def SearchByText(
        self, request: gateway_pb2.SearchByTextRequest, context: Ctx
    ) -> gateway_pb2.SearchByTextResponse:
        result = await self.gw.search_by_text(
            request.query, request.k, self._timeout(context), convert.search_options(request.options)
        )
        return gateway_pb2.SearchByTextResponse(
            hits=convert.hits(result), meta=convert.meta(result), next_page_token=result.next_page_token
        )

    async def SearchByTexts(
        self, request: gateway_pb2.SearchByTextsRequest, context: Ctx
    ) -> gateway_pb2.SearchByTextsResponse:
        results = await self.gw.search_by_texts(
            list(request.queries), request.k, self._timeout(context), convert.search_options(request.options)
        )
        return convert.texts_response(list(request.queries), results)

    async def SearchById(self, request: gateway_pb2.SearchByIdRequest, context: Ctx) -> gateway_pb2.SearchByIdResponse:
        result = await self.gw.search_by_id(
            request.id,
            request.k,
            request.space,
            request.include_self,
            self._timeout(context),
            convert.search_options(request.options),
        )
        return gateway_pb2.SearchByIdResponse(
            hits=convert.hits(result), meta=convert.meta(result), next_page_token=result.next_page_token
        )

    async def SearchByExamples(
        self, request: gateway_pb2.SearchByExamplesRequest, context: Ctx
    ) -> gateway_pb2.SearchByExamplesResponse:
        result = await self.gw.search_by_examples(
            list(request.positive_ids),
            list(request.negative_ids),
            request.text,
            request.k,
            request.space,
            self._timeout(context),
            convert.search_options(request.options),
            convert.rocchio_weights(request),
        )
        return gateway_pb2.SearchByExamplesResponse(
            hits=convert.hits(result), meta=convert.meta(result), next_page_token=result.next_page_token
        )

    async def TagImage(self, request: gateway_pb2.TagImageRequest, context: Ctx) -> gateway_pb2.TagImageResponse:
        r = await self.gw.tag_image(request.image, request.k, request.filter, self._timeout(context))
        return gateway_pb2.TagImageResponse(tags=r.tags, head=r.head, vocabulary_size=r.vocabulary_size)

    async def AddTags(self, request: gateway_pb2.AddTagsRequest, context: Ctx) -> gateway_pb2.AddTagsResponse:
        r = await self.gw.tagger.add_tags(list(request.tags), self._timeout(context))
        self.gw.saw_vocabulary(r.vocabulary_version)
        return gateway_pb2.AddTagsResponse(results=r.results)

    async def RemoveTags(self, request: gateway_pb2.RemoveTagsRequest, context: Ctx) -> gateway_pb2.RemoveTagsResponse:
        r = await self.gw.tagger.remove_tags(list(request.tags), self._timeout(context))
        self.gw.saw_vocabulary(r.vocabulary_version)
        return gateway_pb2.RemoveTagsResponse(results=r.results)

    async def ListTags(self, request: gateway_pb2.ListTagsRequest, context: Ctx) -> gateway_pb2.ListTagsResponse:
        r = await self.gw.tagger.list_tags(
            request.filter, request.page_size, request.page_token, self.gw.vocabulary_version, self._timeout(context)
        )
        return gateway_pb2.ListTagsResponse(tags=r.tags, next_page_token=r.next_page_token, total=r.total)

    async def ListHeads(self, request: gateway_pb2.ListHeadsRequest, context: Ctx) -> gateway_pb2.ListHeadsResponse:
        heads = self.gw.heads
        await heads.refresh()
        return convert.heads_response(heads.catalog.all(), heads.status())

    async def ActivateHead(
        self, request: gateway_pb2.ActivateHeadRequest, context: Ctx
    ) -> gateway_pb2.ActivateHeadResponse:
        if request.skip_reprojection:
            raise InvalidArgument(
                "skip_reprojection is no longer supported: a switch always builds the new head's space, then flips"
            )
        return convert.activate_response(await self.gw.activate_head(request.head))


def build_app() -> tuple[ServiceApp, GatewaySettings]:
    settings = load_settings(GatewaySettings, "gateway")
    enc_channel = peer_channel(settings.encoder_address, settings, peer="the encoder")
    tag_channel = peer_channel(settings.tagger_address, settings, peer="the tagger")
    writer_address = settings.tagger_writer_address or settings.tagger_address
    writer_channel = (
        tag_channel
        if writer_address == settings.tagger_address
        else peer_channel(writer_address, settings, peer="the tagger's vocabulary writer")
    )
    coalescing = Coalescing(settings.coalesce_max_batch, settings.coalesce_inflight)
    shards = [
        ShardClient(
            name,
            address,
            peer_channel(address, settings, peer=f"index shard {name}"),
            coalescing,
        )
        for name, address in settings.shards
    ]
    gateway = Gateway(
        settings,
        CoalescingEncoder(EncoderClient(enc_channel, settings.encoder_address), coalescing),
        TaggerClient(tag_channel, writer_channel),
        shards,
    )
    service = gateway_pb2.DESCRIPTOR.services_by_name["GatewayService"]
    metrics.prime([name for name, _ in settings.shards])

    servicer = GatewayServicer(gateway)
    http: HttpServer | None = None

    async def startup() -> None:
        nonlocal http
        await gateway.start()
        # The HTTP/JSON API and web page (HTTP_PORT, 0: off) call the same servicer, under the same tokens.
        if settings.http_port:
            http = HttpServer(servicer, interceptor if isinstance(interceptor, BearerTokenInterceptor) else None)
            await http.start()

    async def draining() -> None:
        # HTTP drains alongside gRPC: it stops taking requests and finishes those in flight.
        if http is not None:
            await http.stop()

    async def shutdown() -> None:
        await gateway.close()
        for ch in dict.fromkeys([enc_channel, tag_channel, writer_channel, *(s.channel for s in shards)]):
            await ch.close()

    try:
        interceptor = auth_interceptor(
            settings.auth_tokens_file,
            settings.auth_reads,
            WRITE_METHODS,
        )
    except TokenFileError as exc:
        raise SystemExit(f"imgsearch-gateway: {exc}") from None
    app = ServiceApp(
        name="gateway",
        service_names=[service.full_name],
        register=lambda server: gateway_pb2_grpc.add_GatewayServiceServicer_to_server(servicer, server),
        startup=startup,
        draining=draining,
        shutdown=shutdown,
        methods=methods_of(service),
        interceptors=[interceptor] if interceptor is not None else [],
        # The public API: callers authenticate with public bearer tokens (above), never the internal token.
        internal_auth=False,
    )
    return app, settings
