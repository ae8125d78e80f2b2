"""Index service proto <-> domain conversion and the servicer's behaviour before the shard is loaded."""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from imgsearch.api.common.v1 import common_pb2
from imgsearch.api.index.v1 import index_pb2
from imgsearch.index import convert
from imgsearch.index.core import HeadConfig, HeadState, ScanPage, Space
from imgsearch.index.servicer import IndexServicer
from imgsearch.index.store import StoredRecord
from imgsearch.kit.errors import InvalidArgument, Unavailable


def test_space_values() -> None:
    assert convert.space(common_pb2.SPACE_VISUAL) is Space.VISUAL
    assert convert.space(common_pb2.SPACE_SEMANTIC) is Space.SEMANTIC
    with pytest.raises(InvalidArgument, match=r"^space must be SPACE_VISUAL or SPACE_SEMANTIC, got SPACE_UNSPECIFIED$"):
        convert.space(common_pb2.SPACE_UNSPECIFIED)
    with pytest.raises(InvalidArgument, match=r"got 9$"):
        convert.space(9)  # type: ignore[arg-type]


def test_record_input_keeps_absent_and_empty_vectors_apart() -> None:
    absent = convert.record_input(index_pb2.Record(id="a", visual=common_pb2.FloatVector(values=[1.0, 2.0])))
    assert absent.semantic is None
    assert absent.visual is not None
    np.testing.assert_array_equal(absent.visual, [1.0, 2.0])
    # An explicitly empty vector is a wrong-dimension vector (rejected by the core), not a missing one.
    empty = convert.record_input(index_pb2.Record(id="b", semantic=common_pb2.FloatVector()))
    assert empty.semantic is not None
    assert empty.semantic.shape == (0,)


def test_record_input_carries_the_reprojection_signals() -> None:
    msg = index_pb2.Record(
        id="a",
        feature_norm=12.5,
        top_logits=[index_pb2.ClassLogit(class_index=281, logit=9.25), index_pb2.ClassLogit(class_index=0, logit=-1.5)],
    )
    got = convert.record_input(msg)
    assert (got.feature_norm, list(got.top_logits)) == (12.5, [(281, 9.25), (0, -1.5)])
    plain = convert.record_input(index_pb2.Record(id="b"))
    assert (plain.feature_norm, list(plain.top_logits)) == (0.0, [])


def test_semantic_input_keeps_absent_and_empty_vectors_apart() -> None:
    full = convert.semantic_input(
        index_pb2.SemanticUpdate(id="a", semantic=common_pb2.FloatVector(values=[0.5, 1.0]), semantic_head="h@2")
    )
    assert (full.id, full.semantic_head) == ("a", "h@2")
    assert full.semantic is not None
    np.testing.assert_array_equal(full.semantic, [0.5, 1.0])
    assert convert.semantic_input(index_pb2.SemanticUpdate(id="b", semantic_head="h@2")).semantic is None
    empty = convert.semantic_input(index_pb2.SemanticUpdate(id="c", semantic=common_pb2.FloatVector()))
    assert empty.semantic is not None
    assert empty.semantic.shape == (0,)


def test_scan_response_carries_vectors_and_signals() -> None:
    rec = StoredRecord(
        label=3,
        id="s",
        metadata={},
        source_name="s.jpg",
        semantic_head="h@1",
        created_ms=5,
        visual=np.array([1.0, 0.0], np.float32),
        semantic=np.array([0.0, 1.0], np.float32),
        feature_norm=7.75,
        top_logits=((9, 3.5), (4, 2.25)),
    )
    msg = convert.scan_response(ScanPage(records=[rec], next_page_token="3.abc"))
    assert msg.next_page_token == "3.abc"
    (out,) = msg.records
    assert (out.semantic_head, out.feature_norm) == ("h@1", 7.75)
    assert [(c.class_index, c.logit) for c in out.top_logits] == [(9, 3.5), (4, 2.25)]
    assert list(out.visual.values) == [1.0, 0.0]
    assert list(out.semantic.values) == [0.0, 1.0]


def test_stored_record_round_trip() -> None:
    rec = StoredRecord(
        label=7,
        id="x",
        metadata={"k": "v"},
        source_name="x.jpg",
        semantic_head=None,
        created_ms=123,
        visual=np.array([0.6, 0.8], np.float32),
    )
    msg = convert.record(rec)
    assert (msg.id, dict(msg.metadata), msg.source_name, msg.semantic_head, msg.created_unix_ms) == (
        "x",
        {"k": "v"},
        "x.jpg",
        "",
        123,
    )
    assert msg.HasField("visual")
    assert not msg.HasField("semantic")
    np.testing.assert_allclose(msg.visual.values, [0.6, 0.8], rtol=1e-6)


def test_semantics_travel_per_head_both_ways() -> None:
    msg = index_pb2.Record(
        id="m",
        semantics=[
            index_pb2.SemanticVector(head="a@1", vector=common_pb2.FloatVector(values=[1.0, 0.0])),
            index_pb2.SemanticVector(head="b@1"),
        ],
    )
    got = convert.record_input(msg)
    assert [h for h, _ in got.semantics] == ["a@1", "b@1"]
    first, second = (v for _, v in got.semantics)
    assert first is not None
    np.testing.assert_array_equal(first, [1.0, 0.0])
    # An entry without a vector stays one (the core rejects it), rather than vanishing.
    assert second is None
    rec = StoredRecord(
        label=1,
        id="m",
        metadata={},
        source_name="",
        semantic_head="b@1",
        created_ms=1,
        semantic=np.array([0.0, 1.0], np.float32),
        heads=("a@1", "b@1"),
        semantics={"a@1": np.array([1.0, 0.0], np.float32), "b@1": np.array([0.0, 1.0], np.float32)},
    )
    out = convert.record(rec)
    assert [(s.head, list(s.vector.values)) for s in out.semantics] == [("a@1", [1.0, 0.0]), ("b@1", [0.0, 1.0])]
    assert (out.semantic_head, list(out.semantic.values)) == ("b@1", [0.0, 1.0])
    # Read without vectors: the heads only.
    bare = convert.record(
        StoredRecord(label=1, id="m", metadata={}, source_name="", semantic_head="a@1", created_ms=1, heads=("a@1",))
    )
    assert [(s.head, s.HasField("vector")) for s in bare.semantics] == [("a@1", False)]


def test_head_state_responses_carry_the_same_fields() -> None:
    state = HeadState(
        config=HeadConfig(epoch=4, active="a@1", building="b@1"),
        records=9,
        vectors_per_head={"a@1": 9, "b@1": 2},
        last_semantic_write_unix_ms=1234,
        shard="s",
    )
    get = convert.get_head_state_response(state)
    put = convert.set_head_config_response(state)
    for msg in (get, put):
        assert (msg.config.epoch, msg.config.active, msg.config.building) == (4, "a@1", "b@1")
        assert (msg.records, dict(msg.vectors_per_head), msg.last_semantic_write_unix_ms, msg.shard) == (
            9,
            {"a@1": 9, "b@1": 2},
            1234,
            "s",
        )
    config = convert.head_config(index_pb2.HeadConfig(epoch=2, active="x@1"))
    assert config == HeadConfig(epoch=2, active="x@1", building="")


async def test_calls_before_the_shard_is_loaded_are_unavailable() -> None:
    servicer = IndexServicer("shard-7")
    with pytest.raises(Unavailable, match="'shard-7' is still loading") as info:
        await servicer.Stats(index_pb2.StatsRequest(), None)  # type: ignore[arg-type]
    assert info.value.code == grpc.StatusCode.UNAVAILABLE
