"""Conversions between shared protobuf messages (common/v1) and numpy / domain values."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import grpc
import numpy as np
import numpy.typing as npt

from imgsearch.api.common.v1 import common_pb2
from imgsearch.kit.errors import ImgsearchError, InvalidArgument

Matrix = npt.NDArray[np.float32]

TAG_FILTERS: dict[int, str] = {
    common_pb2.TAG_FILTER_UNSPECIFIED: "all",
    common_pb2.TAG_FILTER_ALL: "all",
    common_pb2.TAG_FILTER_SEEN: "seen",
    common_pb2.TAG_FILTER_UNSEEN: "unseen",
}


def to_vector(values: npt.NDArray[np.floating] | Sequence[float]) -> common_pb2.FloatVector:
    return common_pb2.FloatVector(values=np.asarray(values, dtype=np.float32).ravel().tolist())


def from_vector(vec: common_pb2.FloatVector, dim: int | None = None, what: str = "vector") -> Matrix:
    """A FloatVector as float32; checks the dimension and that every value is finite."""
    arr = np.asarray(vec.values, dtype=np.float32)
    if dim is not None and arr.shape[0] != dim:
        raise InvalidArgument(f"{what} has {arr.shape[0]} values, expected {dim}")
    if not np.all(np.isfinite(arr)):
        raise InvalidArgument(f"{what} contains NaN or infinite values")
    return arr


def stack(vectors: Iterable[common_pb2.FloatVector], dim: int, what: str = "vector") -> Matrix:
    """Several FloatVectors of one dimension as an (n, dim) matrix."""
    rows = [from_vector(v, dim, f"{what} {i}") for i, v in enumerate(vectors)]
    if not rows:
        return np.zeros((0, dim), dtype=np.float32)
    return np.stack(rows).astype(np.float32, copy=False)


def item_error(exc: ImgsearchError) -> common_pb2.ItemError:
    return common_pb2.ItemError(code=exc.code.value[0], message=exc.message)


def error_code(err: common_pb2.ItemError) -> grpc.StatusCode:
    for status in grpc.StatusCode:
        if status.value[0] == err.code:
            return status
    return grpc.StatusCode.UNKNOWN


def tag_filter(value: int) -> str:
    """'all', 'seen' or 'unseen' for a TagFilter enum value."""
    try:
        return TAG_FILTERS[value]
    except KeyError:
        raise InvalidArgument(f"unknown tag filter {value}") from None


def check_k(k: int, max_k: int, what: str = "k") -> int:
    """Validate a requested result count."""
    if k < 1 or k > max_k:
        raise InvalidArgument(f"{what} must be between 1 and {max_k}, got {k}")
    return k
