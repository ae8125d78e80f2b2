"""Thin gRPC layer of the public gateway API: parse, call the Gateway core, convert."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from grpc import aio

from imgsearch.api.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from imgsearch.gateway import convert, metrics
from imgsearch.gateway.core import Gateway
from imgsearch.gateway.peers import ShardClient, TaggerClient
from imgsearch.gateway.settings import GatewaySettings
from imgsearch.kit.auth import TokenFileError, auth_interceptor
from imgsearch.kit.encoder_client import EncoderClient
from imgsearch.kit.peers import peer_channel, timeout_for
from imgsearch.kit.server import ServiceApp, methods_of
from imgsearch.kit.settings import load_settings

Ctx = aio.ServicerContext[Any, Any]
_SERVICE = gateway_pb2.DESCRIPTOR.services_by_name["GatewayService"]
# RPCs that change state: they always need a bearer token when authentication is on.
WRITE_METHODS = frozenset(
    f"/{_SERVICE.full_name}/{m}" for m in ("AddImages", "DeleteImages", "AddTags", "RemoveTags", "ActivateHead")
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

    async def DeleteImages(
        self, request: gateway_pb2.DeleteImagesRequest, context: Ctx
    ) -> gateway_pb2.DeleteImagesResponse:
        outcomes, partial = await self.gw.delete_images(list(request.ids), self._timeout(context))
        return convert.delete_response(outcomes, partial)

    async def GetImages(self, request: gateway_pb2.GetImagesRequest, context: Ctx) -> gateway_pb2.GetImagesResponse:
        records, missing, partial = await self.gw.get_images(list(request.ids), self._timeout(context))
        return gateway_pb2.GetImagesResponse(
            images=convert.stored_images(records), missing_ids=missing, partial=partial
        )

    async def SearchByImage(
        self, request: gateway_pb2.SearchByImageRequest, context: Ctx
    ) -> gateway_pb2.SearchByImageResponse:
        result = await self.gw.search_by_image(request.image, request.k, request.space, self._timeout(context))
        return gateway_pb2.SearchByImageResponse(hits=convert.hits(result), meta=convert.meta(result))

    async def SearchByText(
        self, request: gateway_pb2.SearchByTextRequest, context: Ctx
    ) -> gateway_pb2.SearchByTextResponse:
        result = await self.gw.search_by_text(request.query, request.k, self._timeout(context))
        return gateway_pb2.SearchByTextResponse(hits=convert.hits(result), meta=convert.meta(result))

    async def SearchById(self, request: gateway_pb2.SearchByIdRequest, context: Ctx) -> gateway_pb2.SearchByIdResponse:
        result = await self.gw.search_by_id(
            request.id, request.k, request.space, request.include_self, self._timeout(context)
        )
        return gateway_pb2.SearchByIdResponse(hits=convert.hits(result), meta=convert.meta(result))

    async def TagImage(self, request: gateway_pb2.TagImageRequest, context: Ctx) -> gateway_pb2.TagImageResponse:
        r = await self.gw.tag_image(request.image, request.k, request.filter, self._timeout(context))
        return gateway_pb2.TagImageResponse(tags=r.tags, head=r.head, vocabulary_size=r.vocabulary_size)

    async def AddTags(self, request: gateway_pb2.AddTagsRequest, context: Ctx) -> gateway_pb2.AddTagsResponse:
        r = await self.gw.tagger.add_tags(list(request.tags), self._timeout(context))
        return gateway_pb2.AddTagsResponse(results=r.results)

    async def RemoveTags(self, request: gateway_pb2.RemoveTagsRequest, context: Ctx) -> gateway_pb2.RemoveTagsResponse:
        r = await self.gw.tagger.remove_tags(list(request.tags), self._timeout(context))
        return gateway_pb2.RemoveTagsResponse(results=r.results)

    async def ListTags(self, request: gateway_pb2.ListTagsRequest, context: Ctx) -> gateway_pb2.ListTagsResponse:
        r = await self.gw.tagger.list_tags(
            request.filter, request.page_size, request.page_token, self._timeout(context)
        )
        return gateway_pb2.ListTagsResponse(tags=r.tags, next_page_token=r.next_page_token, total=r.total)

    async def ListHeads(self, request: gateway_pb2.ListHeadsRequest, context: Ctx) -> gateway_pb2.ListHeadsResponse:
        return convert.heads_response(await self.gw.tagger.list_heads(self._timeout(context)))

    async def ActivateHead(
        self, request: gateway_pb2.ActivateHeadRequest, context: Ctx
    ) -> gateway_pb2.ActivateHeadResponse:
        switch = await self.gw.activate_head(
            request.head, not request.skip_reprojection, lambda: self._timeout(context)
        )
        return convert.activate_response(switch)


def build_app() -> tuple[ServiceApp, GatewaySettings]:
    settings = load_settings(GatewaySettings, "gateway")
    enc_channel = peer_channel(settings.encoder_address, settings)
    tag_channel = peer_channel(settings.tagger_address, settings)
    shards = [ShardClient(name, address, peer_channel(address, settings)) for name, address in settings.shards]
    gateway = Gateway(
        settings,
        EncoderClient(enc_channel, settings.encoder_address),
        TaggerClient(tag_channel, settings.tagger_address),
        shards,
    )
    service = gateway_pb2.DESCRIPTOR.services_by_name["GatewayService"]
    metrics.prime([name for name, _ in settings.shards])

    async def shutdown() -> None:
        for ch in [enc_channel, tag_channel, *(s.channel for s in shards)]:
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
        register=lambda server: gateway_pb2_grpc.add_GatewayServiceServicer_to_server(GatewayServicer(gateway), server),
        shutdown=shutdown,
        methods=methods_of(service),
        interceptors=[interceptor] if interceptor is not None else [],
    )
    return app, settings
