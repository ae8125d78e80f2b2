"""Run the index service: python -m imgsearch.index."""

from __future__ import annotations

import asyncio

from grpc import aio

from imgsearch.api.index.v1 import index_pb2, index_pb2_grpc
from imgsearch.index.core import ShardIndex
from imgsearch.index.servicer import IndexServicer
from imgsearch.index.settings import IndexSettings
from imgsearch.kit.server import ServiceApp, methods_of, run
from imgsearch.kit.settings import load_settings

SERVICE = index_pb2.DESCRIPTOR.services_by_name["IndexService"]


def build_app() -> tuple[ServiceApp, IndexSettings]:
    settings = load_settings(IndexSettings, "index")
    servicer = IndexServicer(settings.shard)

    def register(server: aio.Server) -> None:
        index_pb2_grpc.add_IndexServiceServicer_to_server(servicer, server)

    async def startup() -> None:
        # Loading (snapshot + replay, or a full rebuild) can take a while: keep the event loop answering health.
        servicer.core = await asyncio.to_thread(ShardIndex, settings)

    async def shutdown() -> None:
        if servicer.core is not None:
            await asyncio.to_thread(servicer.core.close)

    app = ServiceApp(
        name="index",
        service_names=[SERVICE.full_name],
        register=register,
        startup=startup,
        shutdown=shutdown,
        methods=methods_of(SERVICE),
    )
    return app, settings


if __name__ == "__main__":
    run(build_app)
