"""kit.convert's vectors on the wire: packed float32/float16 bytes or repeated floats, validated alike."""

from __future__ import annotations

import numpy as np
import pytest

from imgsearch.api.common.v1 import common_pb2
from imgsearch.kit.convert import from_vector, has_values, packed, stack, to_vector, vector_array, vector_size
from imgsearch.kit.errors import InvalidArgument


def test_packed_is_the_float32_bytes_and_reads_back_exactly() -> None:
    x = np.random.default_rng(0).standard_normal(1280).astype(np.float32)
    vec = packed(x)
    assert vec.packed_f32 == x.astype("<f4").tobytes() and not vec.values and not vec.packed_f16
    wire = common_pb2.FloatVector.FromString(vec.SerializeToString())
    out = from_vector(wire, 1280)
    assert out.dtype == np.float32 and np.array_equal(out, x)
    assert vector_size(wire) == 1280 and has_values(wire)


def test_every_encoding_reads_back_and_the_result_is_a_writable_copy() -> None:
    x = np.array([0.25, -1.5, 3.0], dtype=np.float32)
    for encoding in ("f32", "f16", "values"):
        vec = to_vector(x, encoding=encoding)
        out = from_vector(vec, 3)
        np.testing.assert_allclose(out, x, rtol=1e-3)
        out[0] = 7.0  # a packed read must not be a read-only view of the message's bytes
        assert vector_size(vec) == 3
    assert to_vector(x).values == pytest.approx(x.tolist())  # the default stays the repeated field


def test_a_float64_or_2d_input_is_flattened_to_float32() -> None:
    vec = packed(np.array([[1.0, 2.0], [3.0, 4.0]]))
    assert from_vector(vec).tolist() == [1.0, 2.0, 3.0, 4.0]


def test_dimension_and_finiteness_are_checked_for_packed_vectors() -> None:
    with pytest.raises(InvalidArgument, match="has 3 values, expected 4"):
        from_vector(packed(np.ones(3)), 4, "query")
    with pytest.raises(InvalidArgument, match="NaN or infinite"):
        from_vector(packed(np.array([1.0, np.nan])))
    infinite_f16 = common_pb2.FloatVector(packed_f16=np.array([1.0, np.inf], "<f2").tobytes())
    with pytest.raises(InvalidArgument, match="NaN or infinite"):
        from_vector(infinite_f16)
    with pytest.raises(ValueError, match="half precision"):
        to_vector(np.array([1.0, 1e6]), encoding="f16")


def test_malformed_or_ambiguous_vectors_are_invalid_arguments() -> None:
    with pytest.raises(InvalidArgument, match="not a whole number of float32"):
        vector_array(common_pb2.FloatVector(packed_f32=b"\x00" * 6))
    with pytest.raises(InvalidArgument, match="not a whole number of float16"):
        vector_array(common_pb2.FloatVector(packed_f16=b"\x00" * 3))
    with pytest.raises(InvalidArgument, match="more than one"):
        vector_array(common_pb2.FloatVector(values=[1.0], packed_f32=np.ones(1, "<f4").tobytes()))


def test_empty_vectors_and_stacking_mixed_encodings() -> None:
    empty = common_pb2.FloatVector()
    assert not has_values(empty) and vector_size(empty) == 0 and vector_array(empty).shape == (0,)
    rows = stack([packed([1.0, 2.0]), to_vector([3.0, 4.0]), to_vector([5.0, 6.0], encoding="f16")], 2)
    assert rows.tolist() == [[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]


def test_unknown_encoding_is_a_programming_error() -> None:
    with pytest.raises(ValueError, match="unknown vector encoding"):
        to_vector([1.0], encoding="f64")
