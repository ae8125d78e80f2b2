"""Conversions between index.v1 / common.v1 messages and the ShardIndex domain types, in one place."""

from __future__ import annotations

from collections.abc import Sequence

from imgsearch.api.common.v1 import common_pb2
from imgsearch.api.index.v1 import index_pb2
from imgsearch.index.core import (
    Cursor,
    HeadConfig,
    HeadState,
    Hit,
    RecordInput,
    ScanPage,
    SearchFilter,
    SearchResult,
    SemanticInput,
    ShardStats,
    Space,
    Vector,
    WriteResult,
)
from imgsearch.index.store import StoredRecord, f16_matrix
from imgsearch.kit.convert import item_error, to_vector, vector_array
from imgsearch.kit.errors import InvalidArgument

_SPACES: dict[common_pb2.Space.ValueType, Space] = {
    common_pb2.SPACE_VISUAL: Space.VISUAL,
    common_pb2.SPACE_SEMANTIC: Space.SEMANTIC,
}


def space(value: common_pb2.Space.ValueType) -> Space:
    """The domain space of a Space enum value; unspecified or unknown values are the caller's mistake."""
    found = _SPACES.get(value)
    if found is not None:
        return found
    name = common_pb2.Space.Name(value) if value in common_pb2.Space.values() else str(int(value))
    raise InvalidArgument(f"space must be SPACE_VISUAL or SPACE_SEMANTIC, got {name}")


def _array(vec: common_pb2.FloatVector) -> Vector:
    # Packed float32/float16 bytes or repeated floats, whichever the writer sent (kit.convert.vector_array).
    return vector_array(vec)


def _arrays(vecs: Sequence[common_pb2.FloatVector | None]) -> list[Vector | None]:
    """_array of each vector (None stays None), decoding packed float16 vectors of one length as one matrix.

    A bulk Upsert carries hundreds of packed vectors per space; one frombuffer/astype per batch instead of per
    vector saves most of the per-record decoding cost. Anything else (float32, repeated values, two encodings
    set: an error) goes through _array one by one.
    """
    out: list[Vector | None] = [None] * len(vecs)
    # By length: the positions and the packed bytes (each read of a bytes field copies it, so read it once).
    groups: dict[int, tuple[list[int], list[bytes]]] = {}
    for n, vec in enumerate(vecs):
        if vec is None:
            continue
        f16 = vec.packed_f16
        if f16 and len(f16) % 2 == 0 and not vec.packed_f32 and not len(vec.values):
            where, packed = groups.setdefault(len(f16), ([], []))
            where.append(n)
            packed.append(f16)
        else:
            out[n] = _array(vec)
    for where, packed in groups.values():
        rows = f16_matrix(b"".join(packed), len(where))
        for n, row in zip(where, rows, strict=True):
            out[n] = row
    return out


def record_inputs(recs: Sequence[index_pb2.Record]) -> list[RecordInput]:
    """The Records of one request as given (see record_input), their vectors decoded per space in one go."""
    visual = _arrays([r.visual if r.HasField("visual") else None for r in recs])
    legacy = _arrays([r.semantic if r.HasField("semantic") else None for r in recs])
    entries = [(i, s) for i, r in enumerate(recs) for s in r.semantics]
    decoded = _arrays([s.vector if s.HasField("vector") else None for _, s in entries])
    semantics: list[list[tuple[str, Vector | None]]] = [[] for _ in recs]
    for (i, s), vec in zip(entries, decoded, strict=True):
        semantics[i].append((s.head, vec))
    return [
        RecordInput(
            id=rec.id,
            visual=visual[i],
            semantic=legacy[i],
            semantic_head=rec.semantic_head,
            metadata=dict(rec.metadata),
            source_name=rec.source_name,
            created_unix_ms=rec.created_unix_ms,
            feature_norm=rec.feature_norm,
            top_logits=[(c.class_index, c.logit) for c in rec.top_logits],
            semantics=semantics[i],
            thumbnail=rec.thumbnail,
        )
        for i, rec in enumerate(recs)
    ]


def record_input(rec: index_pb2.Record) -> RecordInput:
    """A Record as given; the core validates it (so one bad record fails alone)."""
    return record_inputs([rec])[0]


def semantic_input(update: index_pb2.SemanticUpdate) -> SemanticInput:
    """A SemanticUpdate as given; the core validates it (so one bad update fails alone)."""
    return SemanticInput(
        id=update.id,
        semantic=_array(update.semantic) if update.HasField("semantic") else None,
        semantic_head=update.semantic_head,
    )


def write_result(result: WriteResult) -> index_pb2.WriteResult:
    if result.error is not None:
        return index_pb2.WriteResult(id=result.id, error=item_error(result.error))
    return index_pb2.WriteResult(id=result.id, changed=result.changed)


def query(request: index_pb2.SearchRequest) -> Vector:
    return _array(request.query)


def search_filter(request: index_pb2.SearchRequest) -> SearchFilter | None:
    if not request.HasField("filter"):
        return None
    f = request.filter
    return SearchFilter(
        terms=[(t.key, list(t.values)) for t in f.terms],
        created_after_ms=f.created_after_unix_ms,
        created_before_ms=f.created_before_unix_ms,
    )


def min_score(request: index_pb2.SearchRequest) -> float | None:
    return request.min_score if request.HasField("min_score") else None


def cursor(request: index_pb2.SearchRequest) -> Cursor | None:
    return Cursor(score=request.after.score, id=request.after.id) if request.HasField("after") else None


def hit(h: Hit, shard: str) -> common_pb2.SearchHit:
    return common_pb2.SearchHit(id=h.id, score=h.score, metadata=h.metadata, source_name=h.source_name, shard=shard)


def search_response(result: SearchResult, shard: str) -> index_pb2.SearchResponse:
    return index_pb2.SearchResponse(hits=[hit(h, shard) for h in result.hits], shard=shard, searched=result.searched)


def record(rec: StoredRecord) -> index_pb2.Record:
    out = index_pb2.Record(
        id=rec.id,
        metadata=rec.metadata,
        source_name=rec.source_name,
        semantic_head=rec.semantic_head or "",
        created_unix_ms=rec.created_ms,
        feature_norm=rec.feature_norm,
        top_logits=[index_pb2.ClassLogit(class_index=c, logit=v) for c, v in rec.top_logits],
    )
    if rec.visual is not None:
        out.visual.CopyFrom(to_vector(rec.visual))
    if rec.semantic is not None:
        out.semantic.CopyFrom(to_vector(rec.semantic))
    for head in rec.heads:
        entry = out.semantics.add(head=head)
        if (vec := rec.semantics.get(head)) is not None:
            entry.vector.CopyFrom(to_vector(vec))
    return out


def scan_response(page: ScanPage) -> index_pb2.ScanResponse:
    return index_pb2.ScanResponse(records=[record(r) for r in page.records], next_page_token=page.next_page_token)


def stats_response(stats: ShardStats) -> index_pb2.StatsResponse:
    return index_pb2.StatsResponse(
        shard=stats.shard,
        count=stats.count,
        visual_dim=stats.visual_dim,
        semantic_dim=stats.semantic_dim,
        semantic_heads=stats.semantic_heads,
        index_type=stats.index_type,
        last_snapshot_unix_ms=stats.last_snapshot_unix_ms,
        wal_entries=stats.wal_entries,
        served_index_types=stats.served_index_types,
    )


def head_config(msg: index_pb2.HeadConfig) -> HeadConfig:
    return HeadConfig(epoch=msg.epoch, active=msg.active, building=msg.building)


def get_head_state_response(state: HeadState) -> index_pb2.GetHeadStateResponse:
    return index_pb2.GetHeadStateResponse(
        config=_config_msg(state.config),
        records=state.records,
        vectors_per_head=state.vectors_per_head,
        last_semantic_write_unix_ms=state.last_semantic_write_unix_ms,
        shard=state.shard,
    )


def set_head_config_response(state: HeadState) -> index_pb2.SetHeadConfigResponse:
    # The same fields as GetHeadStateResponse (buf's naming rules want one response type per RPC).
    out = index_pb2.SetHeadConfigResponse()
    out.ParseFromString(get_head_state_response(state).SerializeToString())
    return out


def _config_msg(config: HeadConfig) -> index_pb2.HeadConfig:
    return index_pb2.HeadConfig(epoch=config.epoch, active=config.active, building=config.building)
