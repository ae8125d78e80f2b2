"""Thin gRPC layer of the tagger: parse, call the Tagger core (writer or read replica), convert."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import AsyncIterator
from typing import Any

import grpc
from grpc import aio

from imgsearch.api.tagger.v1 import tagger_pb2, tagger_pb2_grpc
from imgsearch.kit import convert as common
from imgsearch.kit.encoder_client import EncoderClient
from imgsearch.kit.errors import ImgsearchError
from imgsearch.kit.peers import peer_channel
from imgsearch.kit.server import ServiceApp, methods_of
from imgsearch.kit.settings import load_settings
from imgsearch.tagger import convert
from imgsearch.tagger.core import Tagger, VocabularyWriter
from imgsearch.tagger.replica import ReadReplica, WriterClient
from imgsearch.tagger.settings import TaggerSettings

Ctx = aio.ServicerContext[Any, Any]

log = logging.getLogger(__name__)

MOVED = "projection and head switching moved to the gateway (imgsearch.gateway.v1.GatewayService/ActivateHead)"


class Unimplemented(ImgsearchError):
    """A retired RPC: the caller must use the one the message names."""

    code = grpc.StatusCode.UNIMPLEMENTED


class TaggerServicer(tagger_pb2_grpc.TaggerServiceServicer):
    """TaggerService over a Tagger core."""

    def __init__(self, tagger: Tagger) -> None:
        self.tagger = tagger

    async def ProjectImages(
        self, request: tagger_pb2.ProjectImagesRequest, context: Ctx
    ) -> tagger_pb2.ProjectImagesResponse:
        raise Unimplemented(MOVED)

    async def ProjectTexts(
        self, request: tagger_pb2.ProjectTextsRequest, context: Ctx
    ) -> tagger_pb2.ProjectTextsResponse:
        raise Unimplemented(MOVED)

    async def ActivateHead(
        self, request: tagger_pb2.ActivateHeadRequest, context: Ctx
    ) -> tagger_pb2.ActivateHeadResponse:
        raise Unimplemented(MOVED)

    async def RankTags(self, request: tagger_pb2.RankTagsRequest, context: Ctx) -> tagger_pb2.RankTagsResponse:
        features, logits = convert.signals([request.image])
        which = common.tag_filter(request.filter)
        vocab = await self.tagger.wait_for_version(request.min_vocabulary_version)
        r = await asyncio.to_thread(
            self.tagger.rank,
            features[0],
            None if logits is None else logits[0],
            request.top_k,
            which,
            request.head,
            vocab,
        )
        return tagger_pb2.RankTagsResponse(
            tags=convert.tag_scores(r.tags),
            head=r.head,
            vocabulary_size=r.vocabulary_size,
            vocabulary_version=r.vocabulary_version,
        )

    async def AddTags(self, request: tagger_pb2.AddTagsRequest, context: Ctx) -> tagger_pb2.AddTagsResponse:
        changes = await self.tagger.add_tags(list(request.tags))
        return tagger_pb2.AddTagsResponse(
            results=convert.tag_results(changes.results), vocabulary_version=changes.version
        )

    async def RemoveTags(self, request: tagger_pb2.RemoveTagsRequest, context: Ctx) -> tagger_pb2.RemoveTagsResponse:
        changes = await self.tagger.remove_tags(list(request.tags))
        return tagger_pb2.RemoveTagsResponse(
            results=convert.tag_results(changes.results), vocabulary_version=changes.version
        )

    async def ListTags(self, request: tagger_pb2.ListTagsRequest, context: Ctx) -> tagger_pb2.ListTagsResponse:
        which = common.tag_filter(request.filter)
        vocab = await self.tagger.wait_for_version(request.min_vocabulary_version)
        page = self.tagger.list_tags(which, request.page_size, request.page_token, vocab)
        return tagger_pb2.ListTagsResponse(
            tags=convert.tags(page.tags),
            next_page_token=page.next_page_token,
            total=page.total,
            vocabulary_version=page.vocabulary_version,
        )

    async def ListHeads(self, request: tagger_pb2.ListHeadsRequest, context: Ctx) -> tagger_pb2.ListHeadsResponse:
        heads, default = self.tagger.list_heads()
        return tagger_pb2.ListHeadsResponse(heads=[convert.head(h, default) for h in heads], active=default)

    async def WatchVocabulary(
        self, request: tagger_pb2.WatchVocabularyRequest, context: Ctx
    ) -> AsyncIterator[tagger_pb2.VocabularyUpdate]:
        log.info("replica watching the vocabulary", extra={"replica": request.replica or context.peer()})
        try:
            async for update in self.tagger.watch():
                yield convert.vocab_update_message(update)
        finally:
            log.info("replica stopped watching", extra={"replica": request.replica or context.peer()})


def build_app() -> tuple[ServiceApp, TaggerSettings]:
    settings = load_settings(TaggerSettings, "tagger")
    channels = [peer_channel(settings.encoder_address, settings, peer="the encoder")]
    source = EncoderClient(channels[0], settings.encoder_address)
    tagger: Tagger
    if settings.role == "reader":
        assert settings.writer_address is not None  # the settings validator requires it for a reader
        channels.append(peer_channel(settings.writer_address, settings, peer="the tagger's vocabulary writer"))
        writer = WriterClient(channels[1], settings.writer_address, replica=socket.gethostname())
        tagger = ReadReplica(settings, source, writer)
    else:
        tagger = VocabularyWriter(settings, source)
    service = tagger_pb2.DESCRIPTOR.services_by_name["TaggerService"]

    async def draining() -> None:
        if isinstance(tagger, VocabularyWriter):
            tagger.end_watches()

    async def shutdown() -> None:
        await tagger.close()
        for channel in channels:
            await channel.close()

    app = ServiceApp(
        name="tagger",
        service_names=[service.full_name],
        register=lambda server: tagger_pb2_grpc.add_TaggerServiceServicer_to_server(TaggerServicer(tagger), server),
        startup=tagger.start,
        draining=draining,
        shutdown=shutdown,
        methods=methods_of(service),
    )
    return app, settings
