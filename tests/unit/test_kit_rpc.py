"""The kit's server interceptor on a real grpc.aio server: statuses, one log line per RPC, undecodable requests."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import grpc
import pytest
from google.protobuf import wrappers_pb2
from grpc import aio
from opentelemetry import trace

from imgsearch.kit.errors import InvalidArgument, NotFound, Unavailable
from imgsearch.kit.logs import JsonFormatter
from imgsearch.kit.server import Runner, ServiceApp
from imgsearch.kit.settings import ServerSettings
from imgsearch.kit.tracing import setup_tracing

SERVICE = "imgsearch.test.v1.Probe"
S = wrappers_pb2.StringValue


def method(name: str) -> str:
    return f"/{SERVICE}/{name}"


async def echo(request: wrappers_pb2.StringValue, context: aio.ServicerContext[Any, Any]) -> S:
    return S(value=request.value)


async def abort_not_found(request: S, context: aio.ServicerContext[Any, Any]) -> S:
    await context.abort(grpc.StatusCode.NOT_FOUND, f"no image {request.value!r}")
    raise AssertionError("abort returned")


async def raise_invalid(request: S, context: aio.ServicerContext[Any, Any]) -> S:
    raise InvalidArgument("k must be within 1..1000")


async def raise_unavailable(request: S, context: aio.ServicerContext[Any, Any]) -> S:
    raise Unavailable("the encoder is unavailable", log_fields={"peer_address": "10.1.2.3:50051"})


async def crash(request: S, context: aio.ServicerContext[Any, Any]) -> S:
    raise ZeroDivisionError("a bug")


async def count(requests: AsyncIterator[S], context: aio.ServicerContext[Any, Any]) -> S:
    n = 0
    async for _ in requests:
        n += 1
    return S(value=str(n))


async def stream_then_fail(request: S, context: aio.ServicerContext[Any, Any]) -> AsyncIterator[S]:
    yield S(value="first")
    raise NotFound("the second one is gone")


def register(server: aio.Server) -> None:
    unary = {
        "Echo": echo,
        "Abort": abort_not_found,
        "Invalid": raise_invalid,
        "Unavailable": raise_unavailable,
        "Crash": crash,
    }
    handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {
        name: grpc.unary_unary_rpc_method_handler(fn, S.FromString, S.SerializeToString) for name, fn in unary.items()
    }
    handlers["Count"] = grpc.stream_unary_rpc_method_handler(count, S.FromString, S.SerializeToString)
    handlers["Stream"] = grpc.unary_stream_rpc_method_handler(stream_then_fail, S.FromString, S.SerializeToString)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))


async def start(**settings: Any) -> Runner:
    app = ServiceApp(name="probe", service_names=[SERVICE], register=register)
    runner = Runner(app, ServerSettings(port=0, metrics_port=0, **settings))
    await runner.start()
    await runner.load()
    return runner


@pytest.fixture()
async def probe() -> AsyncIterator[aio.Channel]:
    runner = await start()
    async with aio.insecure_channel(f"127.0.0.1:{runner.port}") as ch:
        yield ch
    await runner.drain()


class Lines(logging.Handler):
    """Every record from anywhere in the process (gRPC's own logger included) while a test runs."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def about(self, name: str) -> list[logging.LogRecord]:
        return [r for r in self.records if r.getMessage().startswith(method(name))]

    def errors(self) -> list[logging.LogRecord]:
        return [r for r in self.records if r.levelno >= logging.ERROR]


@pytest.fixture()
def lines() -> Iterator[Lines]:
    handler = Lines()
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        yield handler
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)


def unary(ch: aio.Channel, name: str) -> aio.UnaryUnaryMultiCallable[S, S]:
    return ch.unary_unary(method(name), request_serializer=S.SerializeToString, response_deserializer=S.FromString)


def raw(ch: aio.Channel, name: str) -> aio.UnaryUnaryMultiCallable[bytes, bytes]:
    """A call that sends bytes as they are: what a broken or hostile client puts on the wire."""
    identity: Callable[[bytes], bytes] = lambda b: b  # noqa: E731
    return ch.unary_unary(method(name), request_serializer=identity, response_deserializer=identity)


async def settle() -> None:
    # The access line is written when the handler's task finishes, just after the status reached the client.
    await asyncio.sleep(0.05)


async def test_ok_call_logs_one_access_line_with_duration(probe: aio.Channel, lines: Lines) -> None:
    assert (await unary(probe, "Echo")(S(value="hi"), timeout=5)).value == "hi"
    await settle()
    [line] = lines.about("Echo")
    assert line.levelno == logging.INFO
    assert line.name == "imgsearch.access"
    assert line.grpc_code == "OK"  # type: ignore[attr-defined]
    assert line.duration_ms >= 0  # type: ignore[attr-defined]
    assert line.caller.startswith("ipv4:127.0.0.1:")  # type: ignore[attr-defined]


async def test_abort_in_handler_is_one_info_line_without_traceback(probe: aio.Channel, lines: Lines) -> None:
    with pytest.raises(aio.AioRpcError) as err:
        await unary(probe, "Abort")(S(value="cat"), timeout=5)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert err.value.details() == "no image 'cat'"
    await settle()
    [line] = lines.about("Abort")
    assert line.levelno == logging.INFO
    assert line.exc_info is None
    assert line.grpc_code == "NOT_FOUND"  # type: ignore[attr-defined]
    # Before the fix gRPC itself logged "Abort error has been replaced!" with a traceback, at ERROR.
    assert lines.errors() == []


async def test_domain_error_is_its_status_and_one_info_line(probe: aio.Channel, lines: Lines) -> None:
    with pytest.raises(aio.AioRpcError) as err:
        await unary(probe, "Invalid")(S(value="x"), timeout=5)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details() == "k must be within 1..1000"
    await settle()
    [line] = lines.about("Invalid")
    assert (line.levelno, line.exc_info) == (logging.INFO, None)
    assert lines.errors() == []


async def test_unavailable_is_a_warning_with_the_cause_only_in_the_log(probe: aio.Channel, lines: Lines) -> None:
    with pytest.raises(aio.AioRpcError) as err:
        await unary(probe, "Unavailable")(S(value="x"), timeout=5)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "10.1.2.3" not in (err.value.details() or "")
    await settle()
    [line] = lines.about("Unavailable")
    assert (line.levelno, line.exc_info) == (logging.WARNING, None)
    assert line.cause == {"peer_address": "10.1.2.3:50051"}  # type: ignore[attr-defined]


async def test_unexpected_exception_is_internal_and_one_error_line_with_traceback(
    probe: aio.Channel, lines: Lines
) -> None:
    with pytest.raises(aio.AioRpcError) as err:
        await unary(probe, "Crash")(S(value="x"), timeout=5)
    assert err.value.code() == grpc.StatusCode.INTERNAL
    assert err.value.details() == f"internal error in {method('Crash')}; see server logs"
    assert "a bug" not in (err.value.details() or "")
    await settle()
    [line] = lines.about("Crash")
    assert line.levelno == logging.ERROR
    assert line.exc_info is not None and line.exc_info[0] is ZeroDivisionError
    # That line is the only error: gRPC logged nothing of its own.
    assert lines.errors() == [line]


@pytest.mark.parametrize(
    "payload",
    [
        pytest.param(b"\xff\xff\xff\xff garbage", id="garbage"),
        # Field 1 (string) holding bytes that are not UTF-8.
        pytest.param(b"\x0a\x02\xff\xfe", id="invalid-utf8"),
    ],
)
async def test_undecodable_unary_request_is_invalid_argument(probe: aio.Channel, lines: Lines, payload: bytes) -> None:
    with pytest.raises(aio.AioRpcError) as err:
        await raw(probe, "Echo")(payload, timeout=5)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (err.value.details() or "").startswith("request is not a valid google.protobuf.StringValue message: ")
    await settle()
    [line] = lines.about("Echo")
    assert (line.levelno, line.exc_info) == (logging.INFO, None)
    assert lines.errors() == []


async def test_undecodable_message_in_a_client_stream_is_invalid_argument(probe: aio.Channel, lines: Lines) -> None:
    identity: Callable[[bytes], bytes] = lambda b: b  # noqa: E731
    call = probe.stream_unary(method("Count"), request_serializer=identity, response_deserializer=identity)

    async def requests() -> AsyncIterator[bytes]:
        yield S(value="fine").SerializeToString()
        yield b"\x0a\x02\xff\xfe"

    with pytest.raises(aio.AioRpcError) as err:
        await call(requests(), timeout=5)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "google.protobuf.StringValue" in (err.value.details() or "")
    await settle()
    assert [r.levelno for r in lines.about("Count")] == [logging.INFO]
    assert lines.errors() == []


async def test_error_after_streamed_responses_keeps_its_code(probe: aio.Channel, lines: Lines) -> None:
    call = probe.unary_stream(
        method("Stream"), request_serializer=S.SerializeToString, response_deserializer=S.FromString
    )
    got = []
    with pytest.raises(aio.AioRpcError) as err:
        async for item in call(S(value="x"), timeout=5):
            got.append(item.value)
    assert got == ["first"]
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    await settle()
    [line] = lines.about("Stream")
    assert (line.levelno, line.grpc_code) == (logging.INFO, "NOT_FOUND")  # type: ignore[attr-defined]


async def test_access_log_level_off_hides_ok_calls_but_not_failures(lines: Lines) -> None:
    runner = await start(access_log_level="OFF")
    try:
        async with aio.insecure_channel(f"127.0.0.1:{runner.port}") as ch:
            await unary(ch, "Echo")(S(value="hi"), timeout=5)
            with pytest.raises(aio.AioRpcError):
                await unary(ch, "Invalid")(S(value="x"), timeout=5)
        await settle()
        assert lines.about("Echo") == []
        assert len(lines.about("Invalid")) == 1
    finally:
        await runner.drain()


def test_json_lines_carry_the_trace_and_span_id_inside_a_span() -> None:
    setup_tracing("probe")
    formatter = JsonFormatter("probe")
    record = logging.makeLogRecord({"msg": "outside", "levelname": "INFO", "name": "t"})
    assert "trace_id" not in json.loads(formatter.format(record))
    with trace.get_tracer("test").start_as_current_span("work") as span:
        inside = json.loads(formatter.format(logging.makeLogRecord({"msg": "in", "levelname": "INFO", "name": "t"})))
        ctx = span.get_span_context()
    assert inside["trace_id"] == f"{ctx.trace_id:032x}"
    assert inside["span_id"] == f"{ctx.span_id:016x}"


async def test_stream_messages_are_counted_as_go_grpc_prometheus_names_them(probe: aio.Channel) -> None:
    from imgsearch.kit import metrics

    received = metrics.MSG_RECEIVED.labels(SERVICE, "Count", "client_stream")
    sent = metrics.MSG_SENT.labels(SERVICE, "Stream", "server_stream")
    before_received, before_sent = received._value.get(), sent._value.get()
    count_call = probe.stream_unary(
        method("Count"), request_serializer=S.SerializeToString, response_deserializer=S.FromString
    )

    async def three() -> AsyncIterator[S]:
        for i in range(3):
            yield S(value=str(i))

    assert (await count_call(three(), timeout=5)).value == "3"
    stream_call = probe.unary_stream(
        method("Stream"), request_serializer=S.SerializeToString, response_deserializer=S.FromString
    )
    with pytest.raises(aio.AioRpcError):
        async for _ in stream_call(S(value="x"), timeout=5):
            pass
    assert received._value.get() - before_received == 3
    assert sent._value.get() - before_sent == 1
