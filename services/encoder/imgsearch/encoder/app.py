"""Wiring of the encoder server: settings, servicer, model loading at startup and cleanup at shutdown."""

from __future__ import annotations

import asyncio
import logging

from grpc import aio

from imgsearch.api.encoder.v1 import encoder_pb2, encoder_pb2_grpc
from imgsearch.encoder import metrics
from imgsearch.encoder.core import Encoder
from imgsearch.encoder.servicer import EncoderServicer
from imgsearch.encoder.settings import EncoderSettings
from imgsearch.kit.server import ServiceApp, methods_of
from imgsearch.kit.settings import load_settings

log = logging.getLogger(__name__)

SERVICE = encoder_pb2.DESCRIPTOR.services_by_name["EncoderService"]


def build_app() -> tuple[ServiceApp, EncoderSettings]:
    settings = load_settings(EncoderSettings, "encoder")
    servicer = EncoderServicer()

    def register(server: aio.Server) -> None:
        encoder_pb2_grpc.add_EncoderServiceServicer_to_server(servicer, server)

    async def startup() -> None:
        metrics.prime()
        # Loading and the warm-up inference take seconds: keep the event loop free to answer health checks.
        encoder = await asyncio.to_thread(Encoder, settings)
        await asyncio.to_thread(encoder.warm_up)
        servicer.encoder = encoder
        info = encoder.info()
        log.info(
            "models loaded",
            extra={
                "image_model": info.image_model_version,
                "text_model": info.text_model_version,
                "providers": list(info.providers),
                "max_batch": settings.max_batch,
                "image_max_wait_ms": encoder.image_wait_ms,
                "text_max_wait_ms": encoder.text_wait_ms,
            },
        )

    async def shutdown() -> None:
        if servicer.encoder is not None:
            await servicer.encoder.close()

    app = ServiceApp(
        name="encoder",
        service_names=[SERVICE.full_name],
        register=register,
        startup=startup,
        shutdown=shutdown,
        methods=methods_of(SERVICE),
    )
    return app, settings
