"""Bearer-token authentication: public tokens at the edge, and one shared internal token between services."""

from __future__ import annotations

import hmac
import logging
import os
import threading
import time
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any

import grpc
from grpc import aio
from prometheus_client import Counter

log = logging.getLogger(__name__)

# Calls that change state on the public API: these always need a token once a tokens file is configured.
# Infrastructure stays open: kubelet probes and grpcurl-style discovery carry no token.
OPEN_PREFIXES = ("/grpc.health.", "/grpc.reflection.")

AUTH_DENIED = Counter(
    "imgsearch_auth_denied_total",
    "Calls refused for a missing or wrong bearer token.",
    ("grpc_method", "reason"),
)


class TokenFileError(Exception):
    """The tokens file is missing, unreadable or holds no token."""


def parse_tokens(text: str) -> list[bytes]:
    """One token per line; blank lines and lines starting with '#' are ignored, whitespace trimmed."""
    tokens = []
    for line in text.splitlines():
        token = line.strip()
        if token and not token.startswith("#"):
            tokens.append(token.encode())
    return tokens


class TokenStore:
    """The accepted tokens, re-read when the file changes (a rotated Kubernetes Secret) at most once a second."""

    def __init__(self, path: Path, recheck_seconds: float = 1.0) -> None:
        self.path = path
        self.recheck_seconds = recheck_seconds
        self._lock = threading.Lock()
        self._stamp = self._stat()
        self._tokens = self._load()
        self._checked = time.monotonic()

    def _stat(self) -> tuple[int, int, int]:
        try:
            st = os.stat(self.path)  # follows the ..data symlink that kubelet swaps on Secret updates
        except OSError as exc:
            raise TokenFileError(f"cannot read tokens file {self.path}: {exc.strerror or exc}") from exc
        return (st.st_ino, st.st_mtime_ns, st.st_size)

    def _load(self) -> list[bytes]:
        try:
            text = self.path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise TokenFileError(f"cannot read tokens file {self.path}: {exc}") from exc
        tokens = parse_tokens(text)
        if not tokens:
            raise TokenFileError(f"tokens file {self.path} holds no token (one per line)")
        return tokens

    def tokens(self) -> list[bytes]:
        now = time.monotonic()
        if now - self._checked < self.recheck_seconds:
            return self._tokens
        with self._lock:
            self._checked = now
            try:
                stamp = self._stat()
                if stamp != self._stamp:
                    self._tokens = self._load()
                    self._stamp = stamp
                    log.info("tokens file reloaded", extra={"path": str(self.path), "tokens": len(self._tokens)})
            except TokenFileError as exc:
                # A rotation caught half-way must not lock everyone out, nor let anyone in.
                log.error("tokens file reload failed; keeping the previous tokens", extra={"error": str(exc)})
            return self._tokens

    def first(self) -> bytes:
        """The token this process presents to others: the file's first one (rotation puts the new one first)."""
        return self.tokens()[0]

    def accepts(self, presented: bytes) -> bool:
        """Constant-time comparison against every token: no early exit, so timing says nothing."""
        ok = False
        for token in self.tokens():
            ok |= hmac.compare_digest(token, presented)
        return ok


def bearer_token(metadata: Iterable[tuple[str, str | bytes]] | None) -> bytes | None:
    """The token of an `authorization: Bearer <token>` metadata entry, or None."""
    for key, value in metadata or ():
        if key.lower() != "authorization":
            continue
        text = value.decode("utf-8", "replace") if isinstance(value, bytes) else value
        scheme, _, token = text.strip().partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip().encode()
        return None
    return None


def _denying_handler(
    handler: grpc.RpcMethodHandler[Any, Any], code: grpc.StatusCode, message: str
) -> grpc.RpcMethodHandler[Any, Any]:
    """A handler of the same shape as `handler` that fails every call with code/message."""

    async def deny(_request: Any, context: aio.ServicerContext[Any, Any]) -> Any:
        await context.abort(code, message)

    async def deny_stream(_request: Any, context: aio.ServicerContext[Any, Any]) -> Any:
        await context.abort(code, message)
        yield  # pragma: no cover  (makes this an async generator; abort raises first)

    args = (handler.request_deserializer, handler.response_serializer)
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(deny, *args)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(deny, *args)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(deny_stream, *args)
    return grpc.stream_stream_rpc_method_handler(deny_stream, *args)


class BearerTokenInterceptor(aio.ServerInterceptor):
    """Requires a valid bearer token on write methods, and on every other method when require_for_reads."""

    def __init__(self, store: TokenStore, require_for_reads: bool, write_methods: Iterable[str]) -> None:
        self.store = store
        self.require_for_reads = require_for_reads
        self.write_methods = frozenset(write_methods)

    def needs_token(self, method: str) -> bool:
        if method.startswith(OPEN_PREFIXES):
            return False
        return self.require_for_reads or method in self.write_methods

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        method = handler_call_details.method
        handler = await continuation(handler_call_details)
        if handler is None or not self.needs_token(method):
            return handler
        token = bearer_token(handler_call_details.invocation_metadata)
        if token is None:
            reason, message = (
                "missing",
                f"{method} requires a bearer token: send metadata 'authorization: Bearer <token>'",
            )
        elif not self.store.accepts(token):
            reason, message = "invalid", f"{method}: the bearer token is not valid"
        else:
            return handler
        AUTH_DENIED.labels(method, reason).inc()
        return _denying_handler(handler, grpc.StatusCode.UNAUTHENTICATED, message)


def auth_interceptor(
    tokens_file: Path | None, require_for_reads: bool, write_methods: Iterable[str]
) -> aio.ServerInterceptor | None:
    """The interceptor to install, or None when no tokens file is configured (authentication off).

    Raises TokenFileError when the file is missing, unreadable or empty: a server configured for
    authentication must not start open.
    """
    if tokens_file is None:
        if require_for_reads:
            raise TokenFileError("authentication of reads was asked for, but no tokens file is configured")
        return None
    return BearerTokenInterceptor(TokenStore(tokens_file), require_for_reads, write_methods)


INTERNAL_DENIED_MESSAGE = "missing or wrong internal credentials"

_stores: dict[Path, TokenStore] = {}
_stores_lock = threading.Lock()


def shared_store(path: Path) -> TokenStore:
    """One TokenStore per file in the process: the server and every peer channel reload it together."""
    key = path.resolve()
    with _stores_lock:
        store = _stores.get(key)
        if store is None:
            store = _stores[key] = TokenStore(path)
        return store


class InternalTokenInterceptor(aio.ServerInterceptor):
    """Requires the shared internal token on every RPC except health and reflection.

    Internal services (encoder, tagger, index) are reached only by other services; the token keeps anything
    else on the network from calling them directly. The reason is counted, never the token itself.
    """

    def __init__(self, store: TokenStore) -> None:
        self.store = store

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        method = handler_call_details.method
        handler = await continuation(handler_call_details)
        if handler is None or method.startswith(OPEN_PREFIXES):
            return handler
        token = bearer_token(handler_call_details.invocation_metadata)
        if token is not None and self.store.accepts(token):
            return handler
        AUTH_DENIED.labels(method, "missing" if token is None else "invalid").inc()
        return _denying_handler(handler, grpc.StatusCode.UNAUTHENTICATED, INTERNAL_DENIED_MESSAGE)


def internal_auth_interceptor(tokens_file: Path | None) -> aio.ServerInterceptor | None:
    """The internal-token interceptor, or None when INTERNAL_TOKEN_FILE is not set (internal calls open).

    Raises TokenFileError when the file is unreadable or empty, so a server never starts open by mistake.
    """
    if tokens_file is None:
        return None
    return InternalTokenInterceptor(shared_store(tokens_file))


def internal_token(tokens_file: Path | None) -> Callable[[], bytes] | None:
    """What peer channels call before each request for the token to send, or None when none is configured."""
    if tokens_file is None:
        return None
    return shared_store(tokens_file).first
