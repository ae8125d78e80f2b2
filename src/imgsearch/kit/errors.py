"""Domain errors raised by the plain-Python cores, each carrying the gRPC status it maps to."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import grpc


class ImgsearchError(Exception):
    """Base error: the servicer layer turns it into a gRPC status with this code and message.

    `message` goes to the caller, so it never names internal addresses; `log_fields` (peer address,
    the peer's raw status) go only to this server's log line for the call.
    """

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __init__(self, message: str, *, log_fields: Mapping[str, Any] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.log_fields: dict[str, Any] = dict(log_fields or {})


class InvalidArgument(ImgsearchError):
    """The request is malformed: the caller must change it."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(ImgsearchError):
    """A named thing (id, tag, head) does not exist."""

    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(ImgsearchError):
    """The thing to create exists already."""

    code = grpc.StatusCode.ALREADY_EXISTS


class ResourceExhausted(ImgsearchError):
    """A size or rate limit was hit (too many items, too many pixels, queue full)."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class FailedPrecondition(ImgsearchError):
    """The system is not in a state that allows the operation (e.g. vector spaces of different heads)."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class Unavailable(ImgsearchError):
    """A dependency is not ready or not reachable; retrying later may succeed."""

    code = grpc.StatusCode.UNAVAILABLE
