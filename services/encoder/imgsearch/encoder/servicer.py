"""EncoderService over gRPC: parse the request, call the core, convert the result."""

from __future__ import annotations

import asyncio
from typing import Any

from grpc import aio

from imgsearch.api.encoder.v1 import encoder_pb2, encoder_pb2_grpc
from imgsearch.encoder import convert
from imgsearch.encoder.core import Encoder
from imgsearch.kit.errors import Unavailable

Context = aio.ServicerContext[Any, Any]


def deadline_of(context: Context) -> float | None:
    """The caller's deadline in event-loop time, or None when it set none."""
    remaining = context.time_remaining()
    # No deadline shows up as None or as an effectively infinite number.
    if remaining is None or remaining > 1e6:
        return None
    return asyncio.get_running_loop().time() + float(remaining)


class EncoderServicer(encoder_pb2_grpc.EncoderServiceServicer):
    """Thin adapter; `encoder` is set once the models are loaded and warmed up."""

    def __init__(self) -> None:
        self.encoder: Encoder | None = None

    def _ready(self) -> Encoder:
        if self.encoder is None:
            raise Unavailable("the encoder is still loading its models; retry shortly")
        return self.encoder

    async def EncodeImages(
        self, request: encoder_pb2.EncodeImagesRequest, context: Context
    ) -> encoder_pb2.EncodeImagesResponse:
        encoder = self._ready()
        results = await encoder.encode_images(
            convert.image_items(request), deadline_of(context), thumbnail_px=request.thumbnail_px
        )
        return convert.images_response(results, request.include_logits, encoder.manifest.image_version)

    async def EncodeTexts(
        self, request: encoder_pb2.EncodeTextsRequest, context: Context
    ) -> encoder_pb2.EncodeTextsResponse:
        encoder = self._ready()
        results = await encoder.encode_texts(list(request.texts), deadline_of(context))
        return convert.texts_response(results, encoder.manifest.text_version)

    async def GetModelInfo(
        self, request: encoder_pb2.GetModelInfoRequest, context: Context
    ) -> encoder_pb2.GetModelInfoResponse:
        return convert.model_info_response(self._ready().info())
