"""Async client for the encoder service, shared by the tagger and the gateway."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from grpc import aio

from imgsearch.api.encoder.v1 import encoder_pb2, encoder_pb2_grpc
from imgsearch.kit.convert import Matrix, error_code, from_vector
from imgsearch.kit.errors import ImgsearchError
from imgsearch.kit.peers import PeerError
from imgsearch.models.manifest import ModelInfo


@dataclass(frozen=True)
class EncodedImage:
    """Features (+ logits, + thumbnail) of one image, or the reason it failed."""

    features: Matrix | None = None
    logits: Matrix | None = None
    error: ImgsearchError | None = None
    # The JPEG asked for with thumbnail_px; empty when not asked for, not made, or the encoder predates it.
    thumbnail: bytes = b""


class EncoderClient:
    """Typed wrapper over EncoderService with deadline propagation.

    `channel` should come from kit.peers.peer_channel(..., peer="the encoder"): its interceptor turns a
    failed call into the ImgsearchError to forward, so the calls here need no error handling of their own.
    """

    def __init__(self, channel: aio.Channel, address: str = "") -> None:
        self.stub = encoder_pb2_grpc.EncoderServiceStub(channel)
        self.address = address

    async def model_info(self, timeout: float) -> ModelInfo:
        r = await self.stub.GetModelInfo(encoder_pb2.GetModelInfoRequest(), timeout=timeout)
        return ModelInfo(
            image_model=r.image_model,
            image_model_version=r.image_model_version,
            image_size=r.image_size,
            feature_dim=r.feature_dim,
            class_labels=tuple(r.class_labels),
            text_model=r.text_model,
            text_model_version=r.text_model_version,
            text_dim=r.text_dim,
            providers=tuple(r.providers),
        )

    async def encode_texts(self, texts: Sequence[str], timeout: float) -> list[Matrix | ImgsearchError]:
        """One embedding (384-d, normalised) or one error per text, in order."""
        r = await self.stub.EncodeTexts(encoder_pb2.EncodeTextsRequest(texts=list(texts)), timeout=timeout)
        out: list[Matrix | ImgsearchError] = []
        for item in r.results:
            if item.HasField("error"):
                out.append(PeerError(error_code(item.error), item.error.message))
            else:
                out.append(from_vector(item.embedding))
        return out

    async def encode_images(
        self, images: Sequence[tuple[bytes, str]], include_logits: bool, timeout: float, thumbnail_px: int = 0
    ) -> list[EncodedImage]:
        """(bytes, name) pairs to one result per image, in order; thumbnail_px > 0 also asks for thumbnails."""
        req = encoder_pb2.EncodeImagesRequest(
            images=[encoder_pb2.ImageInput(data=data, name=name) for data, name in images],
            include_logits=include_logits,
            thumbnail_px=thumbnail_px,
        )
        r = await self.stub.EncodeImages(req, timeout=timeout)
        out = []
        for item in r.results:
            if item.HasField("error"):
                out.append(EncodedImage(error=PeerError(error_code(item.error), item.error.message)))
            else:
                enc = item.encoding
                logits = from_vector(enc.logits) if enc.HasField("logits") else None
                out.append(EncodedImage(features=from_vector(enc.features), logits=logits, thumbnail=enc.thumbnail))
        return out
