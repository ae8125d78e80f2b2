"""Domain types of the index shard: requests, results, head configuration and contract limits."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum

import numpy as np
import numpy.typing as npt

from imgsearch.kit.errors import ImgsearchError

Vector = npt.NDArray[np.float32]

# Limits of the contract (index.proto): top logits per record, ImageNet-style class indices (stored as int16).
MAX_TOP_LOGITS = 32
MAX_CLASS_INDEX = 9999
# Scan page sizes (index.proto): 0 asks for the default.
SCAN_DEFAULT_PAGE = 100
SCAN_MAX_PAGE = 1000


class Space(StrEnum):
    VISUAL = "visual"
    SEMANTIC = "semantic"


@dataclass(frozen=True)
class RecordInput:
    """One record of an Upsert request, not yet validated."""

    id: str
    visual: Vector | None = None
    # Legacy single-head form: counts as one more entry of `semantics` when either is set.
    semantic: Vector | None = None
    semantic_head: str = ""
    metadata: Mapping[str, str] = field(default_factory=dict)
    source_name: str = ""
    # 0: now for a new id, unchanged for a replacement. Set it to carry the time over (e.g. resharding).
    created_unix_ms: int = 0
    # L2 norm of the raw CNN features (0: unknown) and the highest (class_index, logit) pairs, for re-projection.
    feature_norm: float = 0.0
    top_logits: Sequence[tuple[int, float]] = ()
    # (head, vector) per projection head; a None vector is an entry sent without one (a caller's mistake).
    semantics: Sequence[tuple[str, Vector | None]] = ()
    # A small JPEG for result pages; empty: none.
    thumbnail: bytes = b""


@dataclass(frozen=True)
class SemanticInput:
    """One update of a SetSemantic request, not yet validated."""

    id: str
    semantic: Vector | None
    semantic_head: str


@dataclass(frozen=True)
class HeadConfig:
    """Which heads the cluster uses: queries use `active`; `building` is dual-written and backfilled."""

    epoch: int = 0
    active: str = ""
    building: str = ""

    def required(self) -> tuple[str, ...]:
        """Heads every upserted record must have a vector of (none before the first configuration)."""
        if self.epoch == 0:
            return ()
        return (self.active, self.building) if self.building else (self.active,)


@dataclass(frozen=True)
class HeadState:
    config: HeadConfig
    # Live records, and per head the live records holding a vector of it.
    records: int
    vectors_per_head: dict[str, int]
    last_semantic_write_unix_ms: int
    shard: str


@dataclass(frozen=True)
class WriteResult:
    id: str
    changed: bool = False
    error: ImgsearchError | None = None


@dataclass(frozen=True)
class Hit:
    id: str
    score: float
    metadata: dict[str, str]
    source_name: str


@dataclass(frozen=True)
class SearchFilter:
    """Restricts a search: every term must hold (key equal to one of its values), and the creation time must be in
    [created_after_ms, created_before_ms) (0: unbounded)."""

    terms: Sequence[tuple[str, Sequence[str]]] = ()
    created_after_ms: int = 0
    created_before_ms: int = 0

    @property
    def empty(self) -> bool:
        return not self.terms and not self.created_after_ms and not self.created_before_ms

    def matches(self, metadata: Mapping[str, str], created_ms: int) -> bool:
        if self.created_after_ms and created_ms < self.created_after_ms:
            return False
        if self.created_before_ms and created_ms >= self.created_before_ms:
            return False
        return all(metadata.get(key) in values for key, values in self.terms)


@dataclass(frozen=True)
class Cursor:
    """A position in a ranking by (score descending, id ascending): a page returns only hits strictly after it."""

    score: float
    id: str

    def before(self, score: float, id_: str) -> bool:
        """Whether (score, id_) ranks strictly after this position."""
        return score < self.score or (score == self.score and id_ > self.id)


@dataclass(frozen=True)
class SearchResult:
    hits: list[Hit]
    # Vectors in the index that was searched.
    searched: int
    space: Space
    # The semantic head searched (None for visual searches and empty shards).
    head: str | None


@dataclass(frozen=True)
class ShardStats:
    shard: str
    count: int
    visual_count: int
    visual_dim: int
    semantic_dim: int
    semantic_heads: dict[str, int]
    index_type: str
    last_snapshot_unix_ms: int
    wal_entries: int
    # "visual" / "semantic:<head>" -> what searches of that space use now ("Flat" until its ANN index is built).
    served_index_types: dict[str, str] = field(default_factory=dict)
    # The same keys -> vectors in that space's exact tail (every search scans them; the builder merges them).
    exact_tail: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class LoadReport:
    """How the shard came up: from a snapshot plus replay, or rebuilt from SQLite."""

    mode: str  # "snapshot", "rebuild" or "empty"
    seconds: float
    records: int
    replayed_changes: int = 0
    reason: str = ""
