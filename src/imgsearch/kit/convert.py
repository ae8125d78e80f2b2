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


# Packed vectors travel little-endian whatever the byte order of either end.
_WIRE_F32 = np.dtype("<f4")
_WIRE_F16 = np.dtype("<f2")
_F16_MAX = float(np.finfo(np.float16).max)


def to_vector(
    values: npt.NDArray[np.floating] | Sequence[float], *, encoding: str = "values"
) -> common_pb2.FloatVector:
    """A FloatVector holding values.

    encoding "f32" packs little-endian float32 bytes (one copy, no per-element work: what writers on the
    hot paths send, see packed()); "f16" packs half precision (half the bytes, about 3 significant
    digits); "values" (the default, until every reader decodes packed vectors: the tagger's signal checks
    and the index's tests still read `values`) writes the repeated-float field.
    """
    arr = np.asarray(values)
    if encoding == "f32":
        return common_pb2.FloatVector(packed_f32=arr.astype(_WIRE_F32, copy=False).tobytes())
    if encoding == "f16":
        if arr.size and float(np.nanmax(np.abs(arr), initial=0.0)) > _F16_MAX:
            raise ValueError(f"a value exceeds half precision's range (±{_F16_MAX:g}): send float32")
        return common_pb2.FloatVector(packed_f16=arr.astype(_WIRE_F16).tobytes())
    if encoding == "values":
        return common_pb2.FloatVector(values=arr.astype(np.float32, copy=False).ravel().tolist())
    raise ValueError(f"unknown vector encoding {encoding!r}: f32, f16 or values")


def packed(values: npt.NDArray[np.floating] | Sequence[float]) -> common_pb2.FloatVector:
    """A FloatVector as packed little-endian float32 bytes: the encoding writers send to packed-aware readers."""
    return to_vector(values, encoding="f32")


def vector_size(vec: common_pb2.FloatVector) -> int:
    """How many values vec holds, in whichever encoding it came (no decoding)."""
    if vec.packed_f32:
        return len(vec.packed_f32) // _WIRE_F32.itemsize
    if vec.packed_f16:
        return len(vec.packed_f16) // _WIRE_F16.itemsize
    return len(vec.values)


def has_values(vec: common_pb2.FloatVector) -> bool:
    """True when vec holds at least one value in any encoding."""
    return bool(vec.packed_f32 or vec.packed_f16 or vec.values)


def vector_array(vec: common_pb2.FloatVector, what: str = "vector") -> Matrix:
    """The values of vec as a writable float32 array, whichever encoding it came in; no range checks.

    Raises InvalidArgument when more than one encoding is set or a packed field is not whole values.
    """
    f32, f16, listed = vec.packed_f32, vec.packed_f16, len(vec.values) > 0
    if (bool(f32) + bool(f16) + listed) > 1:
        raise InvalidArgument(f"{what} sets more than one of values, packed_f32 and packed_f16")
    if f32:
        if len(f32) % _WIRE_F32.itemsize:
            raise InvalidArgument(f"{what}: packed_f32 is {len(f32)} bytes, not a whole number of float32 values")
        # astype copies: the result is writable, native-endian and does not pin the message's buffer.
        return np.frombuffer(f32, dtype=_WIRE_F32).astype(np.float32)
    if f16:
        if len(f16) % _WIRE_F16.itemsize:
            raise InvalidArgument(f"{what}: packed_f16 is {len(f16)} bytes, not a whole number of float16 values")
        return np.frombuffer(f16, dtype=_WIRE_F16).astype(np.float32)
    return np.asarray(vec.values, dtype=np.float32)


def from_vector(vec: common_pb2.FloatVector, dim: int | None = None, what: str = "vector") -> Matrix:
    """A FloatVector as float32 (any encoding); checks the dimension and that every value is finite."""
    arr = vector_array(vec, what)
    if dim is not None and arr.shape[0] != dim:
        raise InvalidArgument(f"{what} has {arr.shape[0]} values, expected {dim}")
    if not np.isfinite(arr).all():
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
