"""Kit peer channels against real grpc.aio servers: error mapping without addresses, internal token, trace context."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import wrappers_pb2
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opentelemetry import trace

from imgsearch.kit.errors import ImgsearchError, NotFound, Unavailable
from imgsearch.kit.peers import PeerError, peer_channel
from imgsearch.kit.server import Runner, ServiceApp
from imgsearch.kit.settings import ServerSettings
from imgsearch.kit.tracing import setup_tracing
from tests.harness import free_port

SERVICE = "imgsearch.test.v1.Peer"
S = wrappers_pb2.StringValue
TOKEN = "internal-secret-1"


async def traceparent(request: S, context: aio.ServicerContext[Any, Any]) -> S:
    """Answers with the trace id the server span continued (what the caller propagated)."""
    ctx = trace.get_current_span().get_span_context()
    return S(value=f"{ctx.trace_id:032x}" if ctx.is_valid else "")


async def not_found(request: S, context: aio.ServicerContext[Any, Any]) -> S:
    raise NotFound(f"no tag {request.value!r}")


async def count(requests: AsyncIterator[S], context: aio.ServicerContext[Any, Any]) -> S:
    n = 0
    async for _ in requests:
        n += 1
    if n > 2:
        raise NotFound("too many, and none of them exist")
    return S(value=str(n))


async def stream(request: S, context: aio.ServicerContext[Any, Any]) -> AsyncIterator[S]:
    yield S(value="one")
    raise Unavailable("ran dry")


def register(server: aio.Server) -> None:
    ser, de = S.SerializeToString, S.FromString
    handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {
        "Trace": grpc.unary_unary_rpc_method_handler(traceparent, de, ser),
        "NotFound": grpc.unary_unary_rpc_method_handler(not_found, de, ser),
        "Count": grpc.stream_unary_rpc_method_handler(count, de, ser),
        "Stream": grpc.unary_stream_rpc_method_handler(stream, de, ser),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))


async def start(settings: ServerSettings) -> Runner:
    runner = Runner(ServiceApp(name="peer", service_names=[SERVICE], register=register), settings)
    await runner.start()
    await runner.load()
    return runner


def call(ch: aio.Channel, name: str) -> aio.UnaryUnaryMultiCallable[S, S]:
    return ch.unary_unary(
        f"/{SERVICE}/{name}", request_serializer=S.SerializeToString, response_deserializer=S.FromString
    )


@pytest.fixture()
async def server() -> AsyncIterator[Runner]:
    runner = await start(ServerSettings(port=0, metrics_port=0))
    yield runner
    await runner.drain()


async def test_peer_status_becomes_an_imgsearch_error_naming_the_peer(server: Runner) -> None:
    async with peer_channel(f"127.0.0.1:{server.port}", ServerSettings(), peer="the tagger") as ch:
        with pytest.raises(PeerError) as err:
            await call(ch, "NotFound")(S(value="feline"), timeout=5)
    assert err.value.code == grpc.StatusCode.NOT_FOUND
    assert err.value.message == "the tagger: no tag 'feline'"
    assert err.value.log_fields["peer_address"] == f"127.0.0.1:{server.port}"


async def test_unreachable_peer_is_unavailable_without_its_address() -> None:
    address = f"127.0.0.1:{free_port()}"
    async with peer_channel(address, ServerSettings(), peer="index shard index-1") as ch:
        with pytest.raises(Unavailable) as err:
            await call(ch, "NotFound")(S(value="x"), timeout=5)
    assert err.value.message == "index shard index-1 is unavailable"
    assert "127.0.0.1" not in err.value.message
    # The address and gRPC's own words go to the log line instead.
    assert err.value.log_fields["peer_address"] == address
    assert err.value.log_fields["peer_code"] == "UNAVAILABLE"


async def test_streams_are_mapped_too(server: Runner) -> None:
    async with peer_channel(f"127.0.0.1:{server.port}", ServerSettings(), peer="the encoder") as ch:
        client_stream = ch.stream_unary(
            f"/{SERVICE}/Count", request_serializer=S.SerializeToString, response_deserializer=S.FromString
        )

        async def two() -> AsyncIterator[S]:
            for i in range(2):
                yield S(value=str(i))

        async def three() -> AsyncIterator[S]:
            for i in range(3):
                yield S(value=str(i))

        assert (await client_stream(two(), timeout=5)).value == "2"
        with pytest.raises(PeerError) as err:
            await client_stream(three(), timeout=5)
        assert err.value.code == grpc.StatusCode.NOT_FOUND

        server_stream = ch.unary_stream(
            f"/{SERVICE}/Stream", request_serializer=S.SerializeToString, response_deserializer=S.FromString
        )
        got = []
        with pytest.raises(ImgsearchError) as err2:
            async for item in server_stream(S(value="x"), timeout=5):
                got.append(item.value)
        assert got == ["one"]
        assert err2.value.code == grpc.StatusCode.UNAVAILABLE
        # The peer answered itself (it is up): its own message is forwarded, under its logical name.
        assert err2.value.message == "the encoder: ran dry"
        assert err2.value.log_fields["peer_service"] == "peer"


async def test_trace_context_reaches_the_server_span(server: Runner) -> None:
    setup_tracing("peer")
    async with peer_channel(f"127.0.0.1:{server.port}", ServerSettings(), peer="the peer") as ch:
        with trace.get_tracer("test").start_as_current_span("caller") as span:
            seen = (await call(ch, "Trace")(S(), timeout=5)).value
    assert seen == f"{span.get_span_context().trace_id:032x}"


def token_file(tmp_path: Path, *tokens: str, name: str = "internal-token") -> Path:
    path = tmp_path / name
    path.write_text("\n".join(tokens) + "\n")
    return path


async def test_internal_token_is_required_sent_by_peer_channels_and_health_stays_open(tmp_path: Path) -> None:
    # Rotation: the server accepts the old and the new token; callers send the first line.
    tokens = token_file(tmp_path, TOKEN, "old-secret")
    runner = await start(ServerSettings(port=0, metrics_port=0, internal_token_file=tokens))
    address = f"127.0.0.1:{runner.port}"
    try:
        async with aio.insecure_channel(address) as ch:
            for metadata in [(), (("authorization", "Bearer wrong"),), (("authorization", f"Basic {TOKEN}"),)]:
                with pytest.raises(aio.AioRpcError) as err:
                    await call(ch, "Trace")(S(), timeout=5, metadata=metadata)
                assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
                assert err.value.details() == "missing or wrong internal credentials"
            await call(ch, "Trace")(S(), timeout=5, metadata=(("authorization", "Bearer old-secret"),))
            health = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert health.status == health_pb2.HealthCheckResponse.SERVING
        async with peer_channel(address, ServerSettings(internal_token_file=tokens), peer="the peer") as ch:
            await call(ch, "Trace")(S(), timeout=5)
        # A caller with the wrong token sees its own deployment fault, not the public caller's credentials.
        wrong = token_file(tmp_path, "not-it", name="another-deployment")
        async with peer_channel(address, ServerSettings(internal_token_file=wrong), peer="the tagger") as ch:
            with pytest.raises(PeerError) as perr:
                await call(ch, "Trace")(S(), timeout=5)
        assert perr.value.code == grpc.StatusCode.INTERNAL
        assert perr.value.message == "the tagger refused this service's internal credentials"
    finally:
        await runner.drain()


async def test_public_edge_does_not_require_the_internal_token(tmp_path: Path) -> None:
    tokens = token_file(tmp_path, TOKEN)
    app = ServiceApp(name="edge", service_names=[SERVICE], register=register, internal_auth=False)
    runner = Runner(app, ServerSettings(port=0, metrics_port=0, internal_token_file=tokens))
    await runner.start()
    await runner.load()
    try:
        async with aio.insecure_channel(f"127.0.0.1:{runner.port}") as ch:
            await call(ch, "Trace")(S(), timeout=5)
    finally:
        await runner.drain()


def test_empty_internal_token_file_stops_the_server(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.write_text("# nothing yet\n")
    app = ServiceApp(name="peer", service_names=[SERVICE], register=register)
    with pytest.raises(SystemExit, match="holds no token"):
        Runner(app, ServerSettings(port=0, metrics_port=0, internal_token_file=empty))
