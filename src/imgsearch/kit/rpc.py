"""Server interceptor: RPC metrics, one access-log line per RPC, and mapping of errors to gRPC status codes."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from grpc import aio

from imgsearch.kit import metrics
from imgsearch.kit.errors import ImgsearchError, InvalidArgument

log = logging.getLogger(__name__)
# Its own logger, so deployments can route or silence access lines apart from the kit's other messages.
access_log = logging.getLogger("imgsearch.access")

# The caller's doing: logged at INFO, without a traceback, however often they happen.
CLIENT_ERRORS = frozenset(
    {
        "INVALID_ARGUMENT",
        "NOT_FOUND",
        "ALREADY_EXISTS",
        "FAILED_PRECONDITION",
        "OUT_OF_RANGE",
        "RESOURCE_EXHAUSTED",
        "UNAUTHENTICATED",
        "PERMISSION_DENIED",
        "CANCELLED",
        "ABORTED",
        "UNIMPLEMENTED",
    }
)
# A peer or the caller's deadline: worth a look when frequent (alerts count them), no traceback to read.
DEGRADED = frozenset({"UNAVAILABLE", "DEADLINE_EXCEEDED"})

# Trailing metadata on every status a kit server sends: a caller can tell a peer's own answer (whose message is
# public by policy and safe to forward) from a failure of the transport (whose message may hold addresses).
ORIGIN_KEY = "imgsearch-origin"

_LEVELS = {"DEBUG": logging.DEBUG, "INFO": logging.INFO, "WARNING": logging.WARNING, "OFF": None}


def _code_name(context: aio.ServicerContext[Any, Any]) -> str:
    code = context.code()
    if code is None:
        return "OK"
    if isinstance(code, grpc.StatusCode):
        return str(code.name)
    if isinstance(code, int):
        for status in grpc.StatusCode:
            if status.value[0] == code:
                return str(status.name)
    return "UNKNOWN"


class _Undecodable:
    """Stands in for a request message that failed to parse, so the handler wrapper can answer for it."""

    def __init__(self, message: str) -> None:
        self.message = message


def _safe_deserializer(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    """Wrap a request deserializer so garbage becomes INVALID_ARGUMENT instead of gRPC's UNKNOWN/INTERNAL.

    gRPC parses requests before any interceptor code runs and turns a parse failure into an opaque error;
    returning a marker lets the wrapped handler reject the call with a message naming the expected type.
    """
    if deserializer is None:
        return None
    message_class = getattr(deserializer, "__self__", None)
    descriptor = getattr(message_class, "DESCRIPTOR", None)
    type_name = str(getattr(descriptor, "full_name", None) or getattr(message_class, "__name__", "request"))

    def deserialize(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception as exc:  # protobuf raises DecodeError, or other errors for invalid UTF-8 strings
            return _Undecodable(f"request is not a valid {type_name} message: {exc}")

    return deserialize


def _check(request: Any) -> Any:
    if isinstance(request, _Undecodable):
        raise InvalidArgument(request.message)
    return request


async def _checked_stream(requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
    """A client stream that fails on the first message that did not parse, naming why."""
    async for request in requests:
        yield _check(request)


class _Call:
    """One RPC's bookkeeping: metrics, timing, its final code and the single log line that reports it."""

    def __init__(
        self,
        method: str,
        labels: tuple[str, str, str],
        access_level: int | None,
        origin: tuple[tuple[str, str], ...] = (),
    ) -> None:
        self.method = method
        self.origin = origin
        self.labels = labels
        self.access_level = access_level
        self.start = time.perf_counter()
        self.code = "OK"
        self.message = ""
        self.exc: BaseException | None = None
        self.fault = False
        self.fields: dict[str, Any] = {}
        metrics.RPC_STARTED.labels(*labels).inc()
        metrics.RPC_IN_FLIGHT.labels(*labels).inc()

    async def fail(self, exc: Exception, context: aio.ServicerContext[Any, Any]) -> None:
        """Abort the call for `exc`; always raises the AbortError from context.abort, as gRPC requires."""
        self.exc = exc
        if isinstance(exc, ImgsearchError):
            code, message = exc.code, exc.message
            self.fields = dict(exc.log_fields)
        elif isinstance(exc, grpc.RpcError):
            # A call to a peer on a channel without the kit's interceptor: still the peer's failure, not ours.
            from imgsearch.kit.peers import DEFAULT_PEER, peer_error

            mapped = peer_error(exc, DEFAULT_PEER)
            code, message, self.fields = mapped.code, mapped.message, mapped.log_fields
        elif isinstance(exc, NotImplementedError) and _code_name(context) == "UNIMPLEMENTED":
            # The generated servicer base: set_code(UNIMPLEMENTED) then raise NotImplementedError.
            code, message = grpc.StatusCode.UNIMPLEMENTED, "Method not implemented!"
        else:
            code, message = grpc.StatusCode.INTERNAL, f"internal error in {self.method}; see server logs"
        self.code, self.message = str(code.name), message
        self.fault = self.code in ("INTERNAL", "UNKNOWN", "DATA_LOSS")
        if code == grpc.StatusCode.UNAVAILABLE and "peer" in self.fields:
            # Our peer is down, not us: a negative pushback tells the caller's gRPC not to retry (gRFC A6), so
            # one outage does not multiply into retries at every hop. Transport failures still retry.
            context.set_trailing_metadata((*self.origin, ("grpc-retry-pushback-ms", "-1")))
        await context.abort(code, message)

    def aborted(self, context: aio.ServicerContext[Any, Any]) -> None:
        """The handler (or an inner interceptor) aborted the call itself."""
        self.code = _code_name(context)
        details = context.details()
        self.message = details.decode("utf-8", "replace") if isinstance(details, bytes) else str(details or "")

    def cancelled(self, context: aio.ServicerContext[Any, Any]) -> None:
        remaining = context.time_remaining()
        self.code = "DEADLINE_EXCEEDED" if remaining is not None and remaining <= 0 else "CANCELLED"

    def done(self, context: aio.ServicerContext[Any, Any]) -> None:
        elapsed = time.perf_counter() - self.start
        metrics.RPC_IN_FLIGHT.labels(*self.labels).dec()
        metrics.RPC_LATENCY.labels(*self.labels).observe(elapsed)
        metrics.RPC_HANDLED.labels(*self.labels, self.code).inc()
        level: int | None
        if self.code == "OK":
            level = self.access_level
        elif self.code in CLIENT_ERRORS:
            level = max(logging.INFO, self.access_level or logging.INFO)
        elif self.code in DEGRADED:
            level = logging.WARNING
        else:
            level = logging.ERROR
        if level is None or not access_log.isEnabledFor(level):
            return
        extra: dict[str, Any] = {
            "grpc_method": self.method,
            "grpc_code": self.code,
            "duration_ms": round(elapsed * 1000, 3),
            # The caller's address: logs may hold addresses, public messages may not.
            "caller": context.peer(),
        }
        if self.message:
            extra["error"] = self.message
        if self.fields:
            extra["cause"] = self.fields
        # Only a server fault carries its traceback; a client error or an unavailable peer is explained by its code.
        exc_info = self.exc if self.fault and self.exc is not None and not self.fields else None
        access_log.log(level, "%s %s", self.method, self.code, extra=extra, exc_info=exc_info)


class ServerInterceptor(aio.ServerInterceptor):
    """Counts, times and logs every RPC once; maps ImgsearchError and undecodable requests to their status codes.

    `access_log_level` is the level of the line for a successful RPC (None: no line); failures are always
    logged: client errors at INFO, UNAVAILABLE/DEADLINE_EXCEEDED at WARNING, server faults at ERROR with the
    traceback. It should run inside the tracing interceptor so that each line carries the RPC's trace id.
    """

    def __init__(self, access_log_level: str | int | None = "INFO", service: str = "imgsearch") -> None:
        self.origin = ((ORIGIN_KEY, service),)
        if isinstance(access_log_level, str):
            self.access_level = _LEVELS[access_log_level.upper()]
        else:
            self.access_level = access_log_level

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method = handler_call_details.method
        # Health and reflection are infrastructure: keep them out of the RPC metrics and the access log.
        if method.startswith(("/grpc.health.", "/grpc.reflection.")):
            return handler
        deserializer = _safe_deserializer(handler.request_deserializer)
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                self._wrap_unary(handler.unary_unary, method, "unary", streaming_request=False),
                deserializer,
                handler.response_serializer,
            )
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(
                self._wrap_unary(handler.stream_unary, method, "client_stream", streaming_request=True),
                deserializer,
                handler.response_serializer,
            )
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                self._wrap_stream(handler.unary_stream, method, "server_stream", streaming_request=False),
                deserializer,
                handler.response_serializer,
            )
        if handler.stream_stream:
            return grpc.stream_stream_rpc_method_handler(
                self._wrap_stream(handler.stream_stream, method, "bidi_stream", streaming_request=True),
                deserializer,
                handler.response_serializer,
            )
        return handler

    def _wrap_unary(self, behavior: Any, method: str, kind: str, streaming_request: bool) -> Any:
        labels = metrics.labels_for(method, kind)

        async def wrapper(request: Any, context: aio.ServicerContext[Any, Any]) -> Any:
            call = _Call(method, labels, self.access_level, self.origin)
            try:
                context.set_trailing_metadata(self.origin)
                request = (
                    metrics.count_messages(_checked_stream(request), metrics.MSG_RECEIVED.labels(*labels))
                    if streaming_request
                    else _check(request)
                )
                response = await behavior(request, context)
                call.code = _code_name(context)
                return response
            except aio.AbortError:
                # Re-raise gRPC's own AbortError: a new one makes it fail with "Abort error has been replaced!".
                call.aborted(context)
                raise
            except asyncio.CancelledError:
                call.cancelled(context)
                raise
            except Exception as exc:
                await call.fail(exc, context)
                raise  # not reached: context.abort raised
            finally:
                call.done(context)

        return wrapper

    def _wrap_stream(self, behavior: Any, method: str, kind: str, streaming_request: bool) -> Any:
        labels = metrics.labels_for(method, kind)

        async def wrapper(request: Any, context: aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
            call = _Call(method, labels, self.access_level, self.origin)
            try:
                context.set_trailing_metadata(self.origin)
                # Stream message counters as go-grpc-prometheus names them.
                received = metrics.MSG_RECEIVED.labels(*labels)
                sent = metrics.MSG_SENT.labels(*labels)
                request = (
                    metrics.count_messages(_checked_stream(request), received) if streaming_request else _check(request)
                )
                async for item in behavior(request, context):
                    sent.inc()
                    yield item
                call.code = _code_name(context)
            except aio.AbortError:
                call.aborted(context)
                raise
            except asyncio.CancelledError:
                call.cancelled(context)
                raise
            except Exception as exc:
                await call.fail(exc, context)
                raise
            finally:
                call.done(context)

        return wrapper
