"""Validation of index requests: each record, update or configuration checked on its own, with precise messages."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from imgsearch.index.settings import IndexSettings
from imgsearch.index.store import SemanticOp, TopLogits, UpsertOp
from imgsearch.index.types import (
    MAX_CLASS_INDEX,
    MAX_TOP_LOGITS,
    HeadConfig,
    RecordInput,
    SearchFilter,
    SemanticInput,
    Vector,
)
from imgsearch.kit.errors import FailedPrecondition, ImgsearchError, InvalidArgument, ResourceExhausted

_FLOAT32_MAX = float(np.finfo(np.float32).max)


def unit(values: Vector, dim: int, what: str) -> Vector:
    """A finite, non-zero vector of the right dimension, L2-normalised."""
    arr = np.asarray(values, dtype=np.float32).ravel()
    if arr.shape[0] != dim:
        raise InvalidArgument(f"{what} has {arr.shape[0]} values, expected {dim}")
    if not np.all(np.isfinite(arr)):
        raise InvalidArgument(f"{what} contains NaN or infinite values")
    # float64 so that large float32 values do not overflow the norm.
    wide = arr.astype(np.float64)
    norm = float(np.sqrt(np.dot(wide, wide)))
    if norm == 0.0:
        raise InvalidArgument(f"{what} is all zeros and cannot be normalised")
    return (wide / norm).astype(np.float32)


def stored(values: Vector, dim: int, what: str) -> Vector:
    """unit(), rounded to float16: what the shard stores (SQLite and memory), so scores match across restarts."""
    return unit(values, dim, what).astype(np.float16).astype(np.float32)


def stored_rows(vectors: Sequence[Vector | None], dim: int) -> list[Vector | None]:
    """stored() of many vectors as one matrix (a bulk upsert's per-vector numpy calls were most of its validation).

    None where a vector is absent or would be refused (not a float32 vector of dim values, non-finite, all
    zeros): the caller runs stored() on those, which raises the precise error. The same float64 arithmetic as
    unit(), row by row.
    """
    out: list[Vector | None] = [None] * len(vectors)
    pick: list[int] = []
    picked: list[Vector] = []
    for n, v in enumerate(vectors):
        if isinstance(v, np.ndarray) and v.dtype == np.float32 and v.ndim == 1 and v.shape[0] == dim:
            pick.append(n)
            picked.append(v)
    if not pick:
        return out
    wide = np.stack(picked).astype(np.float64)
    with np.errstate(all="ignore"):
        norms = np.sqrt(np.einsum("ij,ij->i", wide, wide))
        ok = np.isfinite(wide).all(axis=1) & (norms > 0.0)
        wide /= norms[:, None]
    rows = wide.astype(np.float32).astype(np.float16).astype(np.float32)
    for n, row, good in zip(pick, rows, ok.tolist(), strict=True):
        if good:
            out[n] = row
    return out


def join_heads(heads: Sequence[str]) -> str:
    return ", ".join(repr(h) for h in sorted(heads))


def check_required_heads(i: int, op: UpsertOp, config: HeadConfig) -> None:
    """A record must carry a vector of every head the configuration in force requires (see HeadConfig)."""
    for head in config.required():
        if head not in op.semantics:
            raise FailedPrecondition(
                f"record {i} ({op.id!r}) has no semantic vector for head {head!r}, which head configuration "
                f"epoch {config.epoch} requires; the writer's head configuration is stale: refresh it "
                "(GetHeadState) and retry with a vector of every configured head"
            )


@dataclass(frozen=True)
class _Prepared:
    """A record's vectors already through stored() (stored_rows); None: absent, or left for stored() to refuse."""

    visual: Vector | None
    semantic: Vector | None
    semantics: Sequence[Vector | None]


class Validator:
    """The request checks of one shard's settings; every method raises an ImgsearchError naming the item."""

    def __init__(self, settings: IndexSettings) -> None:
        self.settings = settings

    def check_batch(self, n: int, what: str) -> None:
        if n > self.settings.max_batch:
            raise ResourceExhausted(
                f"{n} {what} in one request, at most {self.settings.max_batch} allowed; split the request"
            )

    def check_id(self, value: str, what: str) -> None:
        if not value:
            raise InvalidArgument(f"{what}: id must not be empty")
        if len(value) > self.settings.max_id_length:
            raise InvalidArgument(
                f"{what}: id has {len(value)} characters, at most {self.settings.max_id_length} allowed"
            )

    def _check_head(self, head: str, where: str, field: str = "semantic_head") -> None:
        if len(head) > self.settings.max_id_length:
            raise InvalidArgument(f"{where}: {field} has {len(head)} characters, at most {self.settings.max_id_length}")

    def records(self, recs: Sequence[RecordInput]) -> list[UpsertOp | ImgsearchError]:
        """record() of each, in order (an error in place of a refused record); vectors normalised in one go."""
        s = self.settings
        visual = stored_rows([r.visual for r in recs], s.visual_dim)
        legacy = stored_rows([r.semantic for r in recs], s.semantic_dim)
        entries = stored_rows([vec for r in recs for _, vec in r.semantics], s.semantic_dim)
        out: list[UpsertOp | ImgsearchError] = []
        at = 0
        for i, rec in enumerate(recs):
            mine = entries[at : at + len(rec.semantics)]
            at += len(rec.semantics)
            try:
                out.append(self.record(i, rec, _Prepared(visual[i], legacy[i], mine)))
            except ImgsearchError as exc:
                out.append(exc)
        return out

    def record(self, i: int, rec: RecordInput, prepared: _Prepared | None = None) -> UpsertOp:
        """The record as an UpsertOp; `prepared`: its vectors already through stored() (None entries: not yet)."""
        s = self.settings
        pre = prepared or _Prepared(None, None, [None] * len(rec.semantics))
        self.check_id(rec.id, f"record {i}")
        where = f"record {i} ({rec.id!r})"
        visual = pre.visual
        if visual is None and rec.visual is not None:
            visual = stored(rec.visual, s.visual_dim, f"{where}: visual vector")
        semantics = self._semantics(rec, where, pre)
        if visual is None and not semantics:
            raise InvalidArgument(f"{where}: has neither a visual nor a semantic vector")
        if len(rec.metadata) > s.max_metadata_entries:
            raise InvalidArgument(
                f"{where}: {len(rec.metadata)} metadata entries, at most {s.max_metadata_entries} allowed"
            )
        size = sum(len(k.encode()) + len(v.encode()) for k, v in rec.metadata.items())
        if size > s.max_metadata_bytes:
            raise InvalidArgument(f"{where}: metadata is {size} bytes, at most {s.max_metadata_bytes} allowed")
        if len(rec.source_name) > s.max_source_name_length:
            raise InvalidArgument(
                f"{where}: source_name has {len(rec.source_name)} characters, at most {s.max_source_name_length}"
            )
        if len(rec.thumbnail) > s.max_thumbnail_bytes:
            raise InvalidArgument(
                f"{where}: thumbnail is {len(rec.thumbnail)} bytes, at most {s.max_thumbnail_bytes} allowed"
            )
        if rec.created_unix_ms < 0:
            raise InvalidArgument(f"{where}: created_unix_ms must not be negative, got {rec.created_unix_ms}")
        # Both go back out as float32 (proto float): a finite value beyond its range would come back infinite.
        if not (math.isfinite(rec.feature_norm) and 0.0 <= rec.feature_norm <= _FLOAT32_MAX):
            raise InvalidArgument(f"{where}: feature_norm must be finite and not negative, got {rec.feature_norm}")
        return UpsertOp(
            id=rec.id,
            visual=visual,
            semantics=semantics,
            metadata=dict(rec.metadata),
            source_name=rec.source_name,
            created_ms=rec.created_unix_ms,
            feature_norm=float(rec.feature_norm),
            top_logits=self._top_logits(rec.top_logits, where),
            thumbnail=rec.thumbnail,
        )

    def _semantics(self, rec: RecordInput, where: str, pre: _Prepared) -> dict[str, Vector]:
        """The record's semantic vectors by head: the legacy semantic/semantic_head pair, then `semantics`."""
        dim = self.settings.semantic_dim
        out: dict[str, Vector] = {}
        head = rec.semantic_head
        if rec.semantic is not None and not head:
            raise InvalidArgument(
                f"{where}: semantic_head is required with a semantic vector (name@version of the projection head)"
            )
        if rec.semantic is None and head:
            raise InvalidArgument(f"{where}: semantic_head {head!r} given without a semantic vector")
        if rec.semantic is not None:
            self._check_head(head, where)
            out[head] = (
                pre.semantic if pre.semantic is not None else stored(rec.semantic, dim, f"{where}: semantic vector")
            )
        for n, ((head, vec), ready) in enumerate(zip(rec.semantics, pre.semantics, strict=True)):
            what = f"{where}: semantics {n}"
            if not head:
                raise InvalidArgument(f"{what}: head is required (name@version of the projection head)")
            self._check_head(head, what, "head")
            if vec is None:
                raise InvalidArgument(f"{what} (head {head!r}) has no vector")
            if head in out:
                raise InvalidArgument(
                    f"{what}: a second vector of head {head!r} (semantic/semantic_head count as one entry); "
                    "send at most one vector per head"
                )
            out[head] = ready if ready is not None else stored(vec, dim, f"{what} (head {head!r}) vector")
        return out

    @staticmethod
    def _top_logits(pairs: Sequence[tuple[int, float]], where: str) -> TopLogits:
        if len(pairs) > MAX_TOP_LOGITS:
            raise InvalidArgument(f"{where}: {len(pairs)} top_logits, at most {MAX_TOP_LOGITS} allowed")
        seen: set[int] = set()
        out: list[tuple[int, float]] = []
        for n, (class_index, logit) in enumerate(pairs):
            if not 0 <= class_index <= MAX_CLASS_INDEX:
                raise InvalidArgument(
                    f"{where}: top_logits {n} has class_index {class_index}, expected 0..{MAX_CLASS_INDEX}"
                )
            # A class twice would make the dense logits rebuilt from these pairs depend on their order.
            if class_index in seen:
                raise InvalidArgument(f"{where}: top_logits {n} repeats class_index {class_index}")
            if not (math.isfinite(logit) and abs(logit) <= _FLOAT32_MAX):
                raise InvalidArgument(f"{where}: top_logits {n} (class_index {class_index}) has logit {logit}")
            seen.add(class_index)
            out.append((int(class_index), float(logit)))
        return tuple(out)

    def search_filter(self, where: SearchFilter) -> None:
        """A filter's terms name a key and at least one value; its time range is not reversed."""
        if len(where.terms) > self.settings.max_metadata_entries:
            raise InvalidArgument(
                f"filter has {len(where.terms)} terms, at most {self.settings.max_metadata_entries} allowed"
            )
        for n, (key, values) in enumerate(where.terms):
            if not key:
                raise InvalidArgument(f"filter term {n}: key must not be empty")
            if not values:
                raise InvalidArgument(f"filter term {n} ({key!r}): give at least one value")
            if len(values) > self.settings.max_batch:
                raise InvalidArgument(
                    f"filter term {n} ({key!r}): {len(values)} values, at most {self.settings.max_batch} allowed"
                )
        after, before = where.created_after_ms, where.created_before_ms
        if after < 0 or before < 0:
            raise InvalidArgument("filter: created_after_unix_ms and created_before_unix_ms must not be negative")
        if after and before and after >= before:
            raise InvalidArgument(
                f"filter: created_after_unix_ms ({after}) must be below created_before_unix_ms ({before})"
            )

    def semantic(self, i: int, update: SemanticInput) -> SemanticOp:
        s = self.settings
        self.check_id(update.id, f"update {i}")
        where = f"update {i} ({update.id!r})"
        if update.semantic is None:
            raise InvalidArgument(f"{where}: has no semantic vector")
        semantic = stored(update.semantic, s.semantic_dim, f"{where}: semantic vector")
        head = update.semantic_head
        if not head:
            raise InvalidArgument(f"{where}: semantic_head is required (name@version of the projection head)")
        self._check_head(head, where)
        return SemanticOp(id=update.id, semantic=semantic, semantic_head=head)

    def head_config(self, config: HeadConfig) -> HeadConfig:
        if config.epoch < 0:
            raise InvalidArgument(f"head configuration epoch must not be negative, got {config.epoch}")
        if config.epoch > 0 and not config.active:
            raise InvalidArgument(
                f"head configuration epoch {config.epoch} has no active head; name the head queries use (name@version)"
            )
        if config.building and config.building == config.active:
            raise InvalidArgument(
                f"head configuration epoch {config.epoch} builds its active head {config.active!r}; "
                "leave building empty or name another head"
            )
        where = f"head configuration epoch {config.epoch}"
        self._check_head(config.active, where, "active")
        self._check_head(config.building, where, "building")
        return config
