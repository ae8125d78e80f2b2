"""Thin gRPC layer of the tagger: parse, call the Tagger core, convert."""

from __future__ import annotations

import asyncio
from typing import Any

from grpc import aio

from imgsearch.api.tagger.v1 import tagger_pb2, tagger_pb2_grpc
from imgsearch.kit import convert as common
from imgsearch.kit.encoder_client import EncoderClient
from imgsearch.kit.errors import InvalidArgument
from imgsearch.kit.peers import peer_channel
from imgsearch.kit.server import ServiceApp, methods_of
from imgsearch.kit.settings import load_settings
from imgsearch.tagger import convert
from imgsearch.tagger.core import Tagger
from imgsearch.tagger.settings import TaggerSettings

Ctx = aio.ServicerContext[Any, Any]


class TaggerServicer(tagger_pb2_grpc.TaggerServiceServicer):
    """TaggerService over a Tagger core."""

    def __init__(self, tagger: Tagger) -> None:
        self.tagger = tagger

    async def ProjectImages(
        self, request: tagger_pb2.ProjectImagesRequest, context: Ctx
    ) -> tagger_pb2.ProjectImagesResponse:
        features, logits = convert.signals(request.images)
        vectors, head = await asyncio.to_thread(self.tagger.project_images, features, logits)
        return tagger_pb2.ProjectImagesResponse(vectors=convert.vectors(vectors), head=head)

    async def ProjectTexts(
        self, request: tagger_pb2.ProjectTextsRequest, context: Ctx
    ) -> tagger_pb2.ProjectTextsResponse:
        if not request.embeddings:
            raise InvalidArgument("no text embeddings given")
        dim = len(request.embeddings[0].values)
        emb = common.stack(request.embeddings, dim, "text embedding")
        vectors, head = self.tagger.project_texts(emb)
        return tagger_pb2.ProjectTextsResponse(vectors=convert.vectors(vectors), head=head)

    async def RankTags(self, request: tagger_pb2.RankTagsRequest, context: Ctx) -> tagger_pb2.RankTagsResponse:
        features, logits = convert.signals([request.image])
        ranked, head, size = await asyncio.to_thread(
            self.tagger.rank,
            features[0],
            None if logits is None else logits[0],
            request.top_k,
            common.tag_filter(request.filter),
        )
        return tagger_pb2.RankTagsResponse(tags=convert.tag_scores(ranked), head=head, vocabulary_size=size)

    async def AddTags(self, request: tagger_pb2.AddTagsRequest, context: Ctx) -> tagger_pb2.AddTagsResponse:
        changes = await self.tagger.add_tags(list(request.tags))
        return tagger_pb2.AddTagsResponse(results=convert.tag_results(changes))

    async def RemoveTags(self, request: tagger_pb2.RemoveTagsRequest, context: Ctx) -> tagger_pb2.RemoveTagsResponse:
        changes = await self.tagger.remove_tags(list(request.tags))
        return tagger_pb2.RemoveTagsResponse(results=convert.tag_results(changes))

    async def ListTags(self, request: tagger_pb2.ListTagsRequest, context: Ctx) -> tagger_pb2.ListTagsResponse:
        infos, token, total = self.tagger.list_tags(
            common.tag_filter(request.filter), request.page_size, request.page_token
        )
        return tagger_pb2.ListTagsResponse(tags=convert.tags(infos), next_page_token=token, total=total)

    async def ListHeads(self, request: tagger_pb2.ListHeadsRequest, context: Ctx) -> tagger_pb2.ListHeadsResponse:
        heads, active = self.tagger.list_heads()
        return tagger_pb2.ListHeadsResponse(heads=[convert.head(h, active) for h in heads], active=active)

    async def ActivateHead(
        self, request: tagger_pb2.ActivateHeadRequest, context: Ctx
    ) -> tagger_pb2.ActivateHeadResponse:
        head, previous = await self.tagger.activate_head(request.head)
        return tagger_pb2.ActivateHeadResponse(
            head=convert.head(head, f"{head.name}@{head.version}"), previous=previous
        )


def build_app() -> tuple[ServiceApp, TaggerSettings]:
    settings = load_settings(TaggerSettings, "tagger")
    enc_channel = peer_channel(settings.encoder_address, settings)
    tagger = Tagger(settings, EncoderClient(enc_channel, settings.encoder_address))
    service = tagger_pb2.DESCRIPTOR.services_by_name["TaggerService"]

    async def shutdown() -> None:
        await enc_channel.close()
        tagger.close()

    app = ServiceApp(
        name="tagger",
        service_names=[service.full_name],
        register=lambda server: tagger_pb2_grpc.add_TaggerServiceServicer_to_server(TaggerServicer(tagger), server),
        startup=tagger.start,
        shutdown=shutdown,
        methods=methods_of(service),
    )
    return app, settings
