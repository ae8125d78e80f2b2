"""Server interceptor: RPC metrics plus mapping of domain errors to gRPC status codes."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from grpc import aio

from imgsearch.kit import metrics
from imgsearch.kit.errors import ImgsearchError

log = logging.getLogger(__name__)


def _code_name(context: aio.ServicerContext[Any, Any]) -> str:
    code = context.code()
    if code is None:
        return "OK"
    if isinstance(code, grpc.StatusCode):
        return str(code.name)
    try:
        return str(grpc.StatusCode(code).name) if not isinstance(code, int) else _from_int(code)
    except ValueError:
        return "UNKNOWN"


def _from_int(code: int) -> str:
    for status in grpc.StatusCode:
        if status.value[0] == code:
            return str(status.name)
    return "UNKNOWN"


class _Observed:
    """Timing and counting for one RPC."""

    def __init__(self, labels: tuple[str, str, str]) -> None:
        self.labels = labels
        self.start = time.perf_counter()
        metrics.RPC_STARTED.labels(*labels).inc()
        metrics.RPC_IN_FLIGHT.labels(*labels).inc()

    def done(self, code: str) -> None:
        metrics.RPC_IN_FLIGHT.labels(*self.labels).dec()
        metrics.RPC_LATENCY.labels(*self.labels).observe(time.perf_counter() - self.start)
        metrics.RPC_HANDLED.labels(*self.labels, code).inc()


async def _handle_error(exc: BaseException, context: aio.ServicerContext[Any, Any], method: str) -> str:
    """Turn an exception into a status on the context; returns the code name to count."""
    if isinstance(exc, ImgsearchError):
        await _abort(context, exc.code, exc.message)
        return str(exc.code.name)
    log.error("unhandled error in %s", method, exc_info=exc)
    await _abort(context, grpc.StatusCode.INTERNAL, f"internal error in {method}; see server logs")
    return "INTERNAL"


async def _abort(context: aio.ServicerContext[Any, Any], code: grpc.StatusCode, message: str) -> None:
    with contextlib.suppress(aio.AbortError):
        await context.abort(code, message)


class ServerInterceptor(aio.ServerInterceptor):
    """Counts, times and tracks in-flight RPCs; maps ImgsearchError to its status code."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method = handler_call_details.method
        # Health and reflection are infrastructure: keep them out of the RPC metrics.
        if method.startswith(("/grpc.health.", "/grpc.reflection.")):
            return handler
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                self._wrap_unary(handler.unary_unary, method, "unary"),
                handler.request_deserializer,
                handler.response_serializer,
            )
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(
                self._wrap_unary(handler.stream_unary, method, "client_stream"),
                handler.request_deserializer,
                handler.response_serializer,
            )
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                self._wrap_stream(handler.unary_stream, method, "server_stream"),
                handler.request_deserializer,
                handler.response_serializer,
            )
        if handler.stream_stream:
            return grpc.stream_stream_rpc_method_handler(
                self._wrap_stream(handler.stream_stream, method, "bidi_stream"),
                handler.request_deserializer,
                handler.response_serializer,
            )
        return handler

    @staticmethod
    def _wrap_unary(behavior: Any, method: str, kind: str) -> Any:
        labels = metrics.labels_for(method, kind)

        async def wrapper(request: Any, context: aio.ServicerContext[Any, Any]) -> Any:
            obs = _Observed(labels)
            code = "OK"
            try:
                response = await behavior(request, context)
                code = _code_name(context)
                return response
            except aio.AbortError:
                code = _code_name(context)
                raise
            except Exception as exc:
                code = await _handle_error(exc, context, method)
                raise aio.AbortError() from exc
            finally:
                obs.done(code)

        return wrapper

    @staticmethod
    def _wrap_stream(behavior: Any, method: str, kind: str) -> Any:
        labels = metrics.labels_for(method, kind)

        async def wrapper(request: Any, context: aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
            obs = _Observed(labels)
            code = "OK"
            try:
                async for item in behavior(request, context):
                    yield item
                code = _code_name(context)
            except aio.AbortError:
                code = _code_name(context)
                raise
            except Exception as exc:
                code = await _handle_error(exc, context, method)
                raise aio.AbortError() from exc
            finally:
                obs.done(code)

        return wrapper
