"""One trace across two real servers: a kit server calling the real encoder; both access logs carry its trace id."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import wrappers_pb2
from grpc import aio
from opentelemetry import trace

from imgsearch.kit.encoder_client import EncoderClient
from imgsearch.kit.logs import JsonFormatter
from imgsearch.kit.peers import peer_channel, timeout_for
from imgsearch.kit.server import Runner, ServiceApp
from imgsearch.kit.settings import ServerSettings
from imgsearch.kit.tracing import setup_tracing
from tests.harness import ServiceProcess, free_port

RELAY = "imgsearch.test.v1.Relay"
S = wrappers_pb2.StringValue
TOKEN = "encoder-internal-token"


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tracing")
    (path / "internal-token").write_text(TOKEN + "\n")
    return path


@pytest.fixture(scope="module")
def encoder(work: Path, model_dir: Path) -> Iterator[ServiceProcess]:
    proc = ServiceProcess(
        "encoder",
        env={"IMGSEARCH_ENCODER_INTERNAL_TOKEN_FILE": str(work / "internal-token")},
        log_path=work / "encoder.log",
    ).start()
    try:
        yield proc
    finally:
        proc.stop()


@pytest.fixture()
def relay_log(work: Path) -> Iterator[Path]:
    """The relay server runs in this process: its JSON lines go to a file, as a service's stderr would."""
    path = work / "relay.log"
    handler = logging.FileHandler(path)
    handler.setFormatter(JsonFormatter("relay"))
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        yield path
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)
        handler.close()


def access_lines(path: Path) -> list[dict[str, Any]]:
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.startswith("{")]
    return [line for line in lines if line.get("logger") == "imgsearch.access"]


def not_found_port() -> str:
    return f"127.0.0.1:{free_port()}"


async def test_trace_id_reaches_the_access_log_of_every_server_a_request_crossed(
    encoder: ServiceProcess, work: Path, relay_log: Path
) -> None:
    settings = ServerSettings(port=0, metrics_port=0, internal_token_file=work / "internal-token")
    channel = peer_channel(encoder.address, settings, peer="the encoder")
    client = EncoderClient(channel)
    down = EncoderClient(peer_channel(not_found_port(), settings, peer="the encoder"))

    async def relay(request: S, context: aio.ServicerContext[Any, Any]) -> S:
        # Like the tagger or the gateway: a handler that calls a peer through a kit channel.
        target = down if request.value == "down" else client
        info = await target.model_info(timeout_for(context, 10))
        return S(value=info.image_model)

    def register(server: aio.Server) -> None:
        handler = grpc.unary_unary_rpc_method_handler(relay, S.FromString, S.SerializeToString)
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(RELAY, {"Relay": handler}),))

    setup_tracing("relay")
    runner = Runner(ServiceApp(name="relay", service_names=[RELAY], register=register), settings)
    await runner.start()
    await runner.load()
    try:
        async with peer_channel(f"127.0.0.1:{runner.port}", settings, peer="the relay") as ch:
            call = ch.unary_unary(
                f"/{RELAY}/Relay", request_serializer=S.SerializeToString, response_deserializer=S.FromString
            )
            with trace.get_tracer("test").start_as_current_span("request") as span:
                answer = await call(S(value="up"), timeout=30)
            trace_id = f"{span.get_span_context().trace_id:032x}"
            assert answer.value  # the encoder answered, through the internal token
            # A failing peer of a peer: each hop names the next logically, only the logs keep addresses.
            with pytest.raises(Exception) as err:
                await call(S(value="down"), timeout=30)
            assert getattr(err.value, "message", "") == "the relay: the encoder is unavailable"
    finally:
        await runner.drain()
        await channel.close()
    await asyncio.sleep(0.2)  # the encoder writes its line once its handler task ends

    relayed = [line for line in access_lines(relay_log) if line.get("trace_id") == trace_id]
    assert [line["grpc_method"] for line in relayed] == [f"/{RELAY}/Relay"]
    encoded = [line for line in access_lines(encoder.log_path or Path()) if line.get("trace_id") == trace_id]
    assert [line["grpc_method"] for line in encoded] == ["/imgsearch.encoder.v1.EncoderService/GetModelInfo"]
    # Each server logged its own span of the one trace.
    assert relayed[0]["span_id"] != encoded[0]["span_id"]

    # One warning without a traceback: the relay told the caller's channel not to retry (its peer is down, not it).
    [failed] = [line for line in access_lines(relay_log) if line.get("grpc_code") == "UNAVAILABLE"]
    assert failed["level"] == "WARNING" and "exc" not in failed
    assert failed["error"] == "the encoder is unavailable"
    assert failed["cause"]["peer_address"].startswith("127.0.0.1:")
