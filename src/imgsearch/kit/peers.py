"""Client side of service-to-service calls: channels, propagated deadlines, peer error mapping."""

from __future__ import annotations

import json
from typing import Any

import grpc
from grpc import aio

from imgsearch.kit.errors import ImgsearchError, Unavailable
from imgsearch.kit.settings import ServerSettings
from imgsearch.kit.tls import peer_credentials

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


def channel(address: str, max_message_bytes: int, credentials: grpc.ChannelCredentials | None = None) -> aio.Channel:
    """A channel to a peer with message limits, keepalive and retries on UNAVAILABLE."""
    options: list[tuple[str, Any]] = [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.enable_retries", 1),
        ("grpc.service_config", _SERVICE_CONFIG),
        # Reconnect quickly after a peer restarts (default backoff reaches minutes).
        ("grpc.initial_reconnect_backoff_ms", 200),
        ("grpc.max_reconnect_backoff_ms", 2_000),
    ]
    if credentials is not None:
        return aio.secure_channel(address, credentials, options=options)
    return aio.insecure_channel(address, options=options)


def peer_channel(address: str, settings: ServerSettings) -> aio.Channel:
    """A channel to a peer configured from the caller's settings: TLS when PEER_TLS_CA_FILE is set."""
    return channel(address, settings.max_message_bytes, peer_credentials(settings))


def timeout_for(context: aio.ServicerContext[Any, Any] | None, default: float) -> float:
    """Deadline for a downstream call: what is left of the caller's deadline, else the default."""
    if context is None:
        return default
    remaining = context.time_remaining()
    # No caller deadline shows up as None or as an effectively infinite number.
    if remaining is None or remaining > 1e6:
        return default
    return max(0.001, float(remaining))


class PeerError(ImgsearchError):
    """A peer answered with a status we forward as is."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


def peer_error(exc: grpc.RpcError, peer: str) -> ImgsearchError:
    """Map a failed call to a peer onto the status our own caller should see."""
    code = exc.code() if isinstance(exc, aio.AioRpcError) else grpc.StatusCode.UNKNOWN
    details = exc.details() if isinstance(exc, aio.AioRpcError) else str(exc)
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNKNOWN):
        return Unavailable(f"{peer} is unavailable: {details}")
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return PeerError(code, f"deadline exceeded waiting for {peer}")
    return PeerError(code, f"{peer}: {details}")
