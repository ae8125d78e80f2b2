"""Client side of service-to-service calls: channels, internal token, trace context, peer error mapping."""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterable, AsyncIterator, Callable, Generator
from typing import Any

import grpc
from grpc import aio

from imgsearch.kit import tracing
from imgsearch.kit.auth import internal_token
from imgsearch.kit.errors import ImgsearchError, Unavailable
from imgsearch.kit.rpc import ORIGIN_KEY
from imgsearch.kit.settings import ServerSettings
from imgsearch.kit.tls import peer_credentials

# How a peer is named in messages when the caller did not say: never its address.
DEFAULT_PEER = "an internal service"

# Transparent retries for calls that never reached the peer's handler (connection refused, GOAWAY);
# idempotent reads may also retry UNAVAILABLE, which the caller opts into per stub.
_SERVICE_CONFIG = json.dumps(
    {
        # Spread calls over every address a headless Service resolves to (one per pod), instead of
        # pinning all of a process's calls to the first pod; servers cap connection age so new pods
        # are picked up after a scale-out.
        "loadBalancingConfig": [{"round_robin": {}}],
        "methodConfig": [
            {
                "name": [{}],
                "retryPolicy": {
                    "maxAttempts": 3,
                    "initialBackoff": "0.05s",
                    "maxBackoff": "0.5s",
                    "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE"],
                },
            }
        ],
    }
)


class PeerError(ImgsearchError):
    """A peer answered with a status we forward as is."""

    def __init__(self, code: grpc.StatusCode, message: str, *, log_fields: dict[str, Any] | None = None) -> None:
        super().__init__(message, log_fields=log_fields)
        self.code = code


# Addresses that gRPC's own messages carry ("ipv4:10.0.0.7:50052", "[::1]:50061", "10.0.0.7:50052"): defence in
# depth for details forwarded from a peer, which by policy should hold none already.
_ADDRESS = re.compile(r"(?:ipv[46]:)?(?:\[[0-9A-Fa-f:.]+\]|\b\d{1,3}(?:\.\d{1,3}){3})(?::\d+)?")


def _scrub(text: str, address: str | None) -> str:
    if address:
        text = text.replace(address, "<address>")
    return _ADDRESS.sub("<address>", text)


def _answered_by(exc: grpc.RpcError) -> str | None:
    """The kit service that sent this status itself, or None when it came from the transport (or a non-kit server)."""
    if not isinstance(exc, aio.AioRpcError):
        return None
    for key, value in exc.trailing_metadata() or ():
        if key == ORIGIN_KEY:
            return value.decode() if isinstance(value, bytes) else str(value)
    return None


def peer_error(exc: grpc.RpcError, peer: str, address: str | None = None) -> ImgsearchError:
    """Map a failed call to a peer onto the status our own caller should see.

    `peer` is the peer's logical name ("the tagger", "index shard index-1") and is all the message says about
    it; the address and the peer's raw status go into `log_fields`, which only this server's log line shows.
    A status the peer sent itself keeps its (public) message; one from the transport gets a generic one.
    """
    code = exc.code() if isinstance(exc, aio.AioRpcError) else grpc.StatusCode.UNKNOWN
    details = (exc.details() if isinstance(exc, aio.AioRpcError) else str(exc)) or ""
    origin = _answered_by(exc)
    fields: dict[str, Any] = {"peer": peer, "peer_code": code.name, "peer_details": details}
    if address:
        fields["peer_address"] = address
    if origin is not None:
        fields["peer_service"] = origin
    if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
        # The peer refused *our* internal token: a deployment fault, not the public caller's credentials.
        return PeerError(
            grpc.StatusCode.INTERNAL, f"{peer} refused this service's internal credentials", log_fields=fields
        )
    if origin is None and code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNKNOWN):
        return Unavailable(f"{peer} is unavailable", log_fields=fields)
    if origin is None and code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return PeerError(code, f"deadline exceeded waiting for {peer}", log_fields=fields)
    if code == grpc.StatusCode.UNAVAILABLE:
        return Unavailable(f"{peer}: {_scrub(details, address)}", log_fields=fields)
    return PeerError(code, f"{peer}: {_scrub(details, address)}", log_fields=fields)


class _PeerInterceptor:
    """Shared part of the four client interceptors: send the internal token, map failures to ImgsearchError.

    One interceptor instead of a try/except around every stub call: code on a kit channel just awaits the
    stub and gets the ImgsearchError its own caller should see. gRPC's service-config retries run below it.
    """

    def __init__(self, peer: str, address: str | None, token: Callable[[], bytes] | None) -> None:
        self.peer = peer
        self.address = address
        self.token = token

    def _details(self, details: aio.ClientCallDetails) -> aio.ClientCallDetails:
        if self.token is None:
            return details
        metadata = aio.Metadata(*tuple(details.metadata or ()))
        metadata["authorization"] = "Bearer " + self.token().decode()
        return aio.ClientCallDetails(
            details.method, details.timeout, metadata, details.credentials, details.wait_for_ready
        )

    def _error(self, exc: grpc.RpcError) -> ImgsearchError:
        return peer_error(exc, self.peer, self.address)

    async def _stream(self, call: AsyncIterable[Any]) -> AsyncIterator[Any]:
        try:
            async for item in call:
                yield item
        except grpc.RpcError as exc:
            raise self._error(exc) from None


class _MappedUnaryCall:
    """A unary-response call whose await raises the mapped ImgsearchError; everything else is the call's own.

    Returned as a call rather than awaited inside the interceptor: grpc.aio hands a stream-unary interceptor's
    result straight to the caller, so it must stay a call (cancel, done, metadata) for both shapes.
    """

    def __init__(self, call: Any, error: Callable[[grpc.RpcError], ImgsearchError]) -> None:
        self._call = call
        self._map = error

    def __getattr__(self, name: str) -> Any:
        return getattr(self._call, name)

    def __await__(self) -> Generator[Any, None, Any]:
        try:
            return (yield from self._call.__await__())
        except grpc.RpcError as exc:
            raise self._map(exc) from None


# grpc.aio checks isinstance(result, UnaryUnaryCall) to tell a call from a bare response.
aio.UnaryUnaryCall.register(_MappedUnaryCall)
aio.StreamUnaryCall.register(_MappedUnaryCall)


class _UnaryUnary(_PeerInterceptor, aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(
        self, continuation: Callable[..., Any], client_call_details: aio.ClientCallDetails, request: Any
    ) -> Any:
        return _MappedUnaryCall(await continuation(self._details(client_call_details), request), self._error)


class _UnaryStream(_PeerInterceptor, aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(
        self, continuation: Callable[..., Any], client_call_details: aio.ClientCallDetails, request: Any
    ) -> Any:
        return self._stream(await continuation(self._details(client_call_details), request))


class _StreamUnary(_PeerInterceptor, aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(
        self, continuation: Callable[..., Any], client_call_details: aio.ClientCallDetails, request_iterator: Any
    ) -> Any:
        return _MappedUnaryCall(await continuation(self._details(client_call_details), request_iterator), self._error)


class _StreamStream(_PeerInterceptor, aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(
        self, continuation: Callable[..., Any], client_call_details: aio.ClientCallDetails, request_iterator: Any
    ) -> Any:
        return self._stream(await continuation(self._details(client_call_details), request_iterator))


def peer_interceptors(
    peer: str, address: str | None = None, token: Callable[[], bytes] | None = None
) -> list[aio.ClientInterceptor]:
    """The error-mapping and token interceptors for one peer, one per call shape (grpc.aio wants them apart)."""
    return [cls(peer, address, token) for cls in (_UnaryUnary, _UnaryStream, _StreamUnary, _StreamStream)]


def channel(
    address: str,
    max_message_bytes: int,
    credentials: grpc.ChannelCredentials | None = None,
    *,
    peer: str | None = None,
    token: Callable[[], bytes] | None = None,
) -> aio.Channel:
    """A channel to a peer with message limits, keepalive, retries on UNAVAILABLE, tracing and error mapping.

    Calls on it raise ImgsearchError (naming the peer as `peer`, never by address) instead of grpc.RpcError,
    carry the W3C trace context of the active span, and send `authorization: Bearer <token()>` when given.
    """
    options: list[tuple[str, Any]] = [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.enable_retries", 1),
        ("grpc.service_config", _SERVICE_CONFIG),
        # Reconnect quickly after a peer restarts (default backoff reaches minutes).
        ("grpc.initial_reconnect_backoff_ms", 200),
        ("grpc.max_reconnect_backoff_ms", 1_000),
    ]
    # First in the list runs outermost: errors are mapped after the tracing interceptor recorded the raw status.
    interceptors = [*peer_interceptors(peer or DEFAULT_PEER, address, token), *tracing.client_interceptors()]
    if credentials is not None:
        return aio.secure_channel(address, credentials, options=options, interceptors=interceptors)
    return aio.insecure_channel(address, options=options, interceptors=interceptors)


def peer_channel(address: str, settings: ServerSettings, peer: str | None = None) -> aio.Channel:
    """A channel to a peer configured from the caller's settings.

    TLS when PEER_TLS_CA_FILE is set; the internal token (first line of INTERNAL_TOKEN_FILE) on every call when
    set; `peer` is the logical name failures are reported under ("the tagger", "index shard index-1").
    """
    return channel(
        address,
        settings.max_message_bytes,
        peer_credentials(settings),
        peer=peer,
        token=internal_token(settings.internal_token_file),
    )


def timeout_for(context: aio.ServicerContext[Any, Any] | None, default: float) -> float:
    """Deadline for a downstream call: what is left of the caller's deadline, else the default."""
    if context is None:
        return default
    remaining = context.time_remaining()
    # No caller deadline shows up as None or as an effectively infinite number.
    if remaining is None or remaining > 1e6:
        return default
    return max(0.001, float(remaining))
