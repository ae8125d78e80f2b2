"""ShardIndex: one shard of the image index, durable in SQLite and searched with FAISS (plain Python, no gRPC).

Spaces. Each image may have a `visual` vector (CNN features) and a `semantic` vector (a projection into the
text-embedding space, tagged with the head that produced it, name@version). Both are L2-normalised on the way
in, so inner product is cosine similarity. There is one FAISS index for the visual space and one per semantic
head: vectors of different heads live in different spaces and must never be ranked together.

Semantic head policy. A semantic query names the head it was projected with:
- the shard holds vectors of that head: only those are searched (other heads' vectors are in other indexes);
- the shard holds semantic vectors, but none of that head: FAILED_PRECONDITION naming both heads, because
  answering from another head's space would return confident-looking nonsense;
- the shard holds no semantic vectors at all: an empty result (an empty shard is not an error).
An empty head in the query means "whatever this shard holds": fine when it holds one head (or none), and
FAILED_PRECONDITION when it holds several. The per-head index (rather than one index plus an id selector)
keeps each search exact and as small as the head's share, and lets approximate kinds train per head later.

Writes. Validate each record on its own (a bad one gets an error, the others go ahead), commit the whole
request to SQLite in one fsynced transaction, then apply it to FAISS under a short exclusive lock. Writers
are serialised by their own mutex, so the in-memory id map always equals SQLite once a write returns.

Re-projection. When the operator switches the projection head, the gateway re-projects stored images without
their bytes: Upsert keeps each image's raw-feature norm and top ImageNet logits next to its vectors, Scan pages
through every record (by label, so it is stable under concurrent writes and resumable with skip_semantic_head),
and SetSemantic replaces only the semantic vector and head of existing records, moving each from the old head's
index to the new one's. SetSemantic is a write like any other: one fsynced transaction, logged for replay.

Reads. Searches hold a shared lock while FAISS runs (FAISS releases the GIL, so searches run in parallel on
CPU) and fetch hit metadata from SQLite afterwards: labels are never reused, so a hit's label still names the
same id; a record deleted in between is dropped from the hits rather than returned stale.

Snapshots. A background thread writes a snapshot after `snapshot_every` changes or `snapshot_interval_seconds`
(and close() writes a final one). It copies the CPU indexes under the shared lock (searches go on; writers wait
for a memory copy, not for the disk) and writes the copy with no lock held. Start-up loads the newest valid
snapshot and replays the changes after its seq from SQLite; a missing, corrupt or inconsistent snapshot means a
full rebuild from SQLite, which holds every acknowledged write.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import logging
import math
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any

import numpy as np
import numpy.typing as npt

from imgsearch.index import metrics, snapshot
from imgsearch.index.indexes import INDEX_KINDS, VectorSpace, gpu_count
from imgsearch.index.settings import IndexSettings
from imgsearch.index.store import DeleteOp, Op, SemanticOp, Slot, Store, StoredRecord, TopLogits, UpsertOp, VectorChunk
from imgsearch.kit.convert import check_k
from imgsearch.kit.errors import (
    FailedPrecondition,
    ImgsearchError,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unavailable,
)

log = logging.getLogger(__name__)

Vector = npt.NDArray[np.float32]

# Limits of the contract (index.proto): top logits per record, ImageNet-style class indices (stored as int16).
MAX_TOP_LOGITS = 32
MAX_CLASS_INDEX = 9999
# Scan page sizes (index.proto): 0 asks for the default.
SCAN_DEFAULT_PAGE = 100
SCAN_MAX_PAGE = 1000
_FLOAT32_MAX = float(np.finfo(np.float32).max)


class Space(StrEnum):
    VISUAL = "visual"
    SEMANTIC = "semantic"


@dataclass(frozen=True)
class RecordInput:
    """One record of an Upsert request, not yet validated."""

    id: str
    visual: Vector | None = None
    semantic: Vector | None = None
    semantic_head: str = ""
    metadata: Mapping[str, str] = field(default_factory=dict)
    source_name: str = ""
    # 0: now for a new id, unchanged for a replacement. Set it to carry the time over (e.g. resharding).
    created_unix_ms: int = 0
    # L2 norm of the raw CNN features (0: unknown) and the highest (class_index, logit) pairs, for re-projection.
    feature_norm: float = 0.0
    top_logits: Sequence[tuple[int, float]] = ()


@dataclass(frozen=True)
class SemanticInput:
    """One update of a SetSemantic request, not yet validated."""

    id: str
    semantic: Vector | None
    semantic_head: str


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
class SearchResult:
    hits: list[Hit]
    # Vectors in the index that was searched.
    searched: int
    space: Space
    # The semantic head searched (None for visual searches and empty shards).
    head: str | None


@dataclass(frozen=True)
class ScanPage:
    records: list[StoredRecord]
    # Empty when this was the last page.
    next_page_token: str


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


@dataclass(frozen=True)
class LoadReport:
    """How the shard came up: from a snapshot plus replay, or rebuilt from SQLite."""

    mode: str  # "snapshot", "rebuild" or "empty"
    seconds: float
    records: int
    replayed_changes: int = 0
    reason: str = ""


class RWLock:
    """Many readers or one writer; a waiting writer holds off new readers so writes are not starved."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._writer = False
        self._writers_waiting = 0

    @contextlib.contextmanager
    def read(self) -> Iterator[None]:
        with self._cond:
            while self._writer or self._writers_waiting:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                if self._readers == 0:
                    self._cond.notify_all()

    @contextlib.contextmanager
    def write(self) -> Iterator[None]:
        with self._cond:
            self._writers_waiting += 1
            try:
                while self._writer or self._readers:
                    self._cond.wait()
            finally:
                self._writers_waiting -= 1
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()


def _unit(values: Vector, dim: int, what: str) -> Vector:
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


def _join(heads: Sequence[str]) -> str:
    return ", ".join(repr(h) for h in sorted(heads))


@dataclass(frozen=True)
class _Target:
    """What a label holds once a batch is applied."""

    id: str
    # keep_visual: a semantic-only change, the indexed visual vector (if any) stays where it is.
    keep_visual: bool
    visual: Vector | None
    semantic_head: str | None
    semantic: Vector | None


@dataclass
class _Apply:
    """A committed write, resolved to its effect on the in-memory state."""

    final: dict[int, _Target | None]
    changed: list[bool]
    last_seq: int
    changes: int


class ShardIndex:
    """One shard: validated writes, durable storage, exact inner-product search per space."""

    def __init__(self, settings: IndexSettings) -> None:
        self.settings = settings
        self.shard = settings.shard
        self.kind = INDEX_KINDS[settings.index_type]
        self.use_gpu = settings.use_gpu and gpu_count() > 0
        self.directory = settings.shard_dir
        self._store = Store(self.directory, settings.visual_dim, settings.semantic_dim)
        self._lock = RWLock()
        self._write_mutex = threading.Lock()
        self._snapshot_mutex = threading.Lock()
        self._ids: dict[str, int] = {}
        self._slots: dict[int, Slot] = {}
        self._visual = self._space(settings.visual_dim)
        self._semantic: dict[str, VectorSpace] = {}
        self._applied_seq = 0
        self._snapshot_seq = 0
        self._snapshot_ms = 0
        self._wal = 0
        self._snapshot_needed = False
        self._opened = time.time()
        self._closed = False
        self._stop = threading.Event()
        self._wake = threading.Event()
        try:
            self.load_report = self._load()
        except BaseException:
            self._store.close()
            raise
        self._publish()
        metrics.SNAPSHOT_AGE.labels(self.shard).set_function(self.snapshot_age_seconds)
        # Zero-valued series from the start, so dashboards and rate() see them before traffic.
        for op in ("upsert", "delete", "set_semantic"):
            metrics.WRITES.labels(self.shard, op)
        for space in Space:
            metrics.SEARCH_SECONDS.labels(self.shard, space.value, self.kind.name)
        self._thread = threading.Thread(target=self._snapshot_loop, name=f"snapshot-{self.shard}", daemon=True)
        self._thread.start()
        log.info(
            "shard loaded",
            extra={
                "shard": self.shard,
                "mode": self.load_report.mode,
                "records": self.load_report.records,
                "replayed_changes": self.load_report.replayed_changes,
                "seconds": round(self.load_report.seconds, 3),
                "index_type": self.kind.name,
                "device": "gpu" if self.use_gpu else "cpu",
            },
        )

    def _space(self, dim: int, cpu_index: Any | None = None) -> VectorSpace:
        return VectorSpace(self.kind, dim, self.use_gpu, cpu_index, self.settings.search_threads)

    # --- start-up ---

    def _load(self) -> LoadReport:
        t0 = time.perf_counter()
        snapshot.remove_debris(self.directory)
        self._slots = dict(self._store.slots())
        self._ids = {slot.id: label for label, slot in self._slots.items()}
        last_seq = self._store.last_seq()
        self._applied_seq = last_seq
        newest = snapshot.newest(self.directory)
        reason = "no snapshot"
        if newest is not None:
            expected = snapshot.Expected(
                shard_uuid=self._store.shard_uuid,
                index_type=self.kind.name,
                visual_dim=self.settings.visual_dim,
                semantic_dim=self.settings.semantic_dim,
                max_seq=last_seq,
                min_seq=self._store.pruned_seq(),
            )
            try:
                snap = snapshot.load(newest, expected)
                touched, n_changes = self._store.changes_after(snap.seq)
                self._visual = self._space(self.settings.visual_dim, snap.visual)
                self._semantic = {h: self._space(self.settings.semantic_dim, i) for h, i in snap.semantic.items()}
                self._replay(touched)
                problem = self._verify()
                if problem is not None:
                    raise snapshot.SnapshotError(f"{newest.name}: after replay, {problem}")
                self._snapshot_seq, self._snapshot_ms, self._wal = snap.seq, snap.created_ms, n_changes
                self._snapshot_needed = n_changes >= self.settings.snapshot_every
                return LoadReport("snapshot", time.perf_counter() - t0, len(self._slots), n_changes)
            except snapshot.SnapshotError as exc:
                reason = str(exc)
                log.warning("snapshot unusable, rebuilding from SQLite", extra={"shard": self.shard, "why": reason})
        self._visual = self._space(self.settings.visual_dim)
        self._semantic = {}
        for chunk in self._store.vectors():
            self._add_chunk(chunk)
        self._sync_spaces()
        _, self._wal = self._store.changes_after(0)
        # Whatever a snapshot would save next start, write it now (in the background) rather than rebuild again.
        self._snapshot_needed = bool(self._slots) or newest is not None
        mode = "rebuild" if self._slots else "empty"
        return LoadReport(mode, time.perf_counter() - t0, len(self._slots), 0, reason)

    def _replay(self, touched: list[int]) -> None:
        """Bring snapshot indexes up to date: drop every label changed since, re-add its current vectors."""
        if not touched:
            return
        for space in [self._visual, *self._semantic.values()]:
            space.remove(np.asarray(touched, dtype=np.int64))
        # One add per index: the first add after loading a snapshot reallocates the whole index (a loaded
        # index has no spare capacity), so adding chunk by chunk would copy it once per chunk.
        merged = VectorChunk()
        for chunk in self._store.vectors(touched):
            merged.visual_labels += chunk.visual_labels
            merged.visual += chunk.visual
            for head, (head_labels, blobs) in chunk.semantic.items():
                group = merged.semantic.setdefault(head, ([], []))
                group[0].extend(head_labels)
                group[1].extend(blobs)
        self._add_chunk(merged)
        self._semantic = {h: s for h, s in self._semantic.items() if s.ntotal > 0}
        self._sync_spaces()

    def _verify(self) -> str | None:
        """Check that the FAISS indexes hold exactly the labels SQLite says they should."""
        want_visual = sorted(label for label, s in self._slots.items() if s.has_visual)
        want_heads: dict[str, list[int]] = {}
        for label, s in self._slots.items():
            if s.semantic_head is not None:
                want_heads.setdefault(s.semantic_head, []).append(label)
        if not np.array_equal(np.sort(self._visual.labels()), np.asarray(want_visual, dtype=np.int64)):
            return f"the visual index holds {self._visual.ntotal} vectors, SQLite {len(want_visual)}"
        if set(self._semantic) != set(want_heads):
            return f"semantic heads {_join(list(self._semantic))} in FAISS, {_join(list(want_heads))} in SQLite"
        for head, labels in want_heads.items():
            if not np.array_equal(np.sort(self._semantic[head].labels()), np.sort(np.asarray(labels, np.int64))):
                return f"the index of head {head!r} does not hold the labels SQLite has for it"
        return None

    def _add_chunk(self, chunk: VectorChunk) -> None:
        if chunk.visual_labels:
            self._visual.add(np.asarray(chunk.visual_labels, np.int64), self._matrix(chunk.visual, "visual"))
        for head, (labels, blobs) in chunk.semantic.items():
            space = self._semantic.get(head)
            if space is None:
                space = self._semantic[head] = self._space(self.settings.semantic_dim)
            space.add(np.asarray(labels, np.int64), self._matrix(blobs, "semantic"))

    def _matrix(self, blobs: list[bytes], space: str) -> Vector:
        dim = self.settings.visual_dim if space == "visual" else self.settings.semantic_dim
        if any(len(b) != dim * 4 for b in blobs):
            raise FailedPrecondition(f"{self._store.path} holds a {space} vector that is not {dim} float32 values")
        return np.frombuffer(b"".join(blobs), dtype="<f4").reshape(len(blobs), dim).astype(np.float32)

    def _sync_spaces(self) -> None:
        for space in [self._visual, *self._semantic.values()]:
            space.sync()

    # --- validation ---

    def _check_id(self, value: str, what: str) -> None:
        if not value:
            raise InvalidArgument(f"{what}: id must not be empty")
        if len(value) > self.settings.max_id_length:
            raise InvalidArgument(
                f"{what}: id has {len(value)} characters, at most {self.settings.max_id_length} allowed"
            )

    def _validate(self, i: int, rec: RecordInput) -> UpsertOp:
        s = self.settings
        self._check_id(rec.id, f"record {i}")
        where = f"record {i} ({rec.id!r})"
        if rec.visual is None and rec.semantic is None:
            raise InvalidArgument(f"{where}: has neither a visual nor a semantic vector")
        visual = None if rec.visual is None else _unit(rec.visual, s.visual_dim, f"{where}: visual vector")
        semantic = None if rec.semantic is None else _unit(rec.semantic, s.semantic_dim, f"{where}: semantic vector")
        head = rec.semantic_head
        if semantic is not None and not head:
            raise InvalidArgument(
                f"{where}: semantic_head is required with a semantic vector (name@version of the projection head)"
            )
        if semantic is None and head:
            raise InvalidArgument(f"{where}: semantic_head {head!r} given without a semantic vector")
        if len(head) > s.max_id_length:
            raise InvalidArgument(f"{where}: semantic_head has {len(head)} characters, at most {s.max_id_length}")
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
        if rec.created_unix_ms < 0:
            raise InvalidArgument(f"{where}: created_unix_ms must not be negative, got {rec.created_unix_ms}")
        # Both go back out as float32 (proto float): a finite value beyond its range would come back infinite.
        if not (math.isfinite(rec.feature_norm) and 0.0 <= rec.feature_norm <= _FLOAT32_MAX):
            raise InvalidArgument(f"{where}: feature_norm must be finite and not negative, got {rec.feature_norm}")
        return UpsertOp(
            id=rec.id,
            visual=visual,
            semantic=semantic,
            semantic_head=head or None,
            metadata=dict(rec.metadata),
            source_name=rec.source_name,
            created_ms=rec.created_unix_ms,
            feature_norm=float(rec.feature_norm),
            top_logits=self._check_top_logits(rec.top_logits, where),
        )

    @staticmethod
    def _check_top_logits(pairs: Sequence[tuple[int, float]], where: str) -> TopLogits:
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

    def _validate_semantic(self, i: int, update: SemanticInput) -> SemanticOp:
        s = self.settings
        self._check_id(update.id, f"update {i}")
        where = f"update {i} ({update.id!r})"
        if update.semantic is None:
            raise InvalidArgument(f"{where}: has no semantic vector")
        semantic = _unit(update.semantic, s.semantic_dim, f"{where}: semantic vector")
        head = update.semantic_head
        if not head:
            raise InvalidArgument(f"{where}: semantic_head is required (name@version of the projection head)")
        if len(head) > s.max_id_length:
            raise InvalidArgument(f"{where}: semantic_head has {len(head)} characters, at most {s.max_id_length}")
        return SemanticOp(id=update.id, semantic=semantic, semantic_head=head)

    def _check_open(self) -> None:
        if self._closed:
            raise Unavailable(f"shard {self.shard!r} is shut down")

    def _check_batch(self, n: int, what: str) -> None:
        if n > self.settings.max_batch:
            raise ResourceExhausted(
                f"{n} {what} in one request, at most {self.settings.max_batch} allowed; split the request"
            )

    # --- writes ---

    def upsert(self, records: Sequence[RecordInput]) -> list[WriteResult]:
        """Insert or replace records by id; each result says changed=True for a new id."""
        self._check_open()
        self._check_batch(len(records), "records")
        results: list[WriteResult | None] = [None] * len(records)
        ops: list[Op] = []
        where: list[int] = []
        for i, rec in enumerate(records):
            try:
                ops.append(self._validate(i, rec))
                where.append(i)
            except ImgsearchError as exc:
                results[i] = WriteResult(id=rec.id, error=exc)
        for i, changed in zip(where, self._write(ops), strict=True):
            results[i] = WriteResult(id=records[i].id, changed=changed)
        metrics.WRITES.labels(self.shard, "upsert").inc(len(ops))
        return [r for r in results if r is not None]

    def delete(self, ids: Sequence[str]) -> list[WriteResult]:
        """Delete records by id; changed=True when the id existed."""
        self._check_open()
        self._check_batch(len(ids), "ids")
        results: list[WriteResult | None] = [None] * len(ids)
        ops: list[Op] = []
        where: list[int] = []
        for i, id_ in enumerate(ids):
            try:
                self._check_id(id_, f"id {i}")
                ops.append(DeleteOp(id=id_))
                where.append(i)
            except ImgsearchError as exc:
                results[i] = WriteResult(id=id_, error=exc)
        changed = self._write(ops)
        for i, c in zip(where, changed, strict=True):
            results[i] = WriteResult(id=ids[i], changed=c)
        metrics.WRITES.labels(self.shard, "delete").inc(sum(changed))
        return [r for r in results if r is not None]

    def set_semantic(self, updates: Sequence[SemanticInput]) -> list[WriteResult]:
        """Replace the semantic vector and head of stored records; an id not stored fails alone with NOT_FOUND.

        Nothing else of a record changes (visual vector, metadata, source, creation time, re-projection
        signals). changed=True for every update applied.
        """
        self._check_open()
        self._check_batch(len(updates), "updates")
        results: list[WriteResult | None] = [None] * len(updates)
        ops: list[Op] = []
        where: list[int] = []
        for i, update in enumerate(updates):
            try:
                ops.append(self._validate_semantic(i, update))
                where.append(i)
            except ImgsearchError as exc:
                results[i] = WriteResult(id=update.id, error=exc)
        applied = self._write(ops)
        for i, found in zip(where, applied, strict=True):
            id_ = updates[i].id
            if found:
                results[i] = WriteResult(id=id_, changed=True)
            else:
                # Deleted since the caller read it (e.g. between a Scan page and this update): nothing to replace.
                results[i] = WriteResult(id=id_, error=NotFound(f"update {i} ({id_!r}): no record with this id"))
        metrics.WRITES.labels(self.shard, "set_semantic").inc(sum(applied))
        return [r for r in results if r is not None]

    def _write(self, ops: Sequence[Op]) -> list[bool]:
        if not ops:
            return []
        with self._write_mutex:
            self._check_open()
            outcome = self._store.write(ops)
            plan = self._resolve(ops, outcome.labels, outcome.last_seq)
            # Committed: if applying fails now (only out of memory can do that), SQLite still has the write and
            # the next start rebuilds FAISS from it; the caller sees an error and may retry (upserts are idempotent).
            self._apply(plan)
        if self._wal >= self.settings.snapshot_every:
            self._wake.set()
        return plan.changed

    def _resolve(self, ops: Sequence[Op], labels: list[int | None], last_seq: int) -> _Apply:
        """Net effect of a committed batch (later ops on the same id win) and per-op 'changed' flags.

        'changed': upsert, the id is new; delete and set_semantic, the id existed.
        """
        final: dict[int, _Target | None] = {}
        seen: dict[str, int | None] = {}
        changed: list[bool] = []
        changes = 0
        for op, label in zip(ops, labels, strict=True):
            prior = seen[op.id] if op.id in seen else self._ids.get(op.id)
            if isinstance(op, UpsertOp):
                assert label is not None
                changed.append(prior is None)
                seen[op.id] = label
                final[label] = _Target(op.id, False, op.visual, op.semantic_head, op.semantic)
                changes += 1
            elif isinstance(op, SemanticOp):
                changed.append(label is not None)
                if label is not None:
                    # On top of an upsert earlier in this batch, or of what the label holds now.
                    base = final.get(label) or _Target(op.id, True, None, None, None)
                    final[label] = replace(base, semantic_head=op.semantic_head, semantic=op.semantic)
                    changes += 1
            else:
                changed.append(label is not None)
                if label is not None:
                    seen[op.id] = None
                    final[label] = None
                    changes += 1
        return _Apply(final=final, changed=changed, last_seq=last_seq, changes=changes)

    def _apply(self, plan: _Apply) -> None:
        """Make FAISS and the id map reflect a committed batch (under the exclusive lock)."""
        drop_visual: list[int] = []
        drop_heads: dict[str, list[int]] = {}
        add_visual: tuple[list[int], list[Vector]] = ([], [])
        add_heads: dict[str, tuple[list[int], list[Vector]]] = {}
        slots: dict[int, Slot] = {}
        for label, target in plan.final.items():
            old = self._slots.get(label)
            keep_visual = target is not None and target.keep_visual
            if old is not None:
                if old.has_visual and not keep_visual:
                    drop_visual.append(label)
                if old.semantic_head is not None:
                    drop_heads.setdefault(old.semantic_head, []).append(label)
            if target is None:
                continue
            if keep_visual:
                has_visual = old is not None and old.has_visual
            else:
                has_visual = target.visual is not None
                if target.visual is not None:
                    add_visual[0].append(label)
                    add_visual[1].append(target.visual)
            if target.semantic is not None and target.semantic_head is not None:
                group = add_heads.setdefault(target.semantic_head, ([], []))
                group[0].append(label)
                group[1].append(target.semantic)
            slots[label] = Slot(target.id, has_visual, target.semantic_head)
        with self._lock.write():
            self._visual.remove(np.asarray(drop_visual, np.int64))
            for head, labels in drop_heads.items():
                self._semantic[head].remove(np.asarray(labels, np.int64))
            if add_visual[0]:
                self._visual.add(np.asarray(add_visual[0], np.int64), np.stack(add_visual[1]))
            for head, (labels, vecs) in add_heads.items():
                space = self._semantic.get(head)
                if space is None:
                    space = self._semantic[head] = self._space(self.settings.semantic_dim)
                space.add(np.asarray(labels, np.int64), np.stack(vecs))
            self._semantic = {h: s for h, s in self._semantic.items() if s.ntotal > 0}
            self._sync_spaces()
            # Two passes: a batch may delete an id and insert it again under a new label.
            for label in plan.final:
                old = self._slots.pop(label, None)
                if old is not None and self._ids.get(old.id) == label:
                    del self._ids[old.id]
            for label, slot in slots.items():
                self._slots[label] = slot
                self._ids[slot.id] = label
            self._applied_seq = plan.last_seq
            self._wal += plan.changes
            self._publish_locked()

    # --- reads ---

    def search(
        self,
        space: Space,
        query: Vector,
        k: int,
        exclude_ids: Sequence[str] = (),
        semantic_head: str = "",
    ) -> SearchResult:
        """The k stored vectors of one space with the highest inner product with the normalised query."""
        self._check_open()
        check_k(k, self.settings.max_k)
        if len(exclude_ids) > self.settings.max_exclude_ids:
            raise ResourceExhausted(f"{len(exclude_ids)} exclude_ids, at most {self.settings.max_exclude_ids} allowed")
        dim = self.settings.visual_dim if space is Space.VISUAL else self.settings.semantic_dim
        q = _unit(query, dim, f"query for the {space.value} space")[None, :]
        t0 = time.perf_counter()
        with self._lock.read():
            index, head = self._pick(space, semantic_head)
            if index is None or index.ntotal == 0:
                return SearchResult(hits=[], searched=0, space=space, head=head)
            excluded = {self._ids[i] for i in exclude_ids if i in self._ids}
            searched = index.ntotal
            scores, labels = index.search(q, min(k + len(excluded), searched))
        ranked = [
            (int(label), float(score))
            for score, label in zip(scores[0], labels[0], strict=True)
            if label >= 0 and int(label) not in excluded
        ][:k]
        found = self._store.fetch([label for label, _ in ranked])
        hits = [
            Hit(id=rec.id, score=score, metadata=rec.metadata, source_name=rec.source_name)
            for label, score in ranked
            if (rec := found.get(label)) is not None
        ]
        metrics.SEARCH_SECONDS.labels(self.shard, space.value, self.kind.name).observe(time.perf_counter() - t0)
        return SearchResult(hits=hits, searched=searched, space=space, head=head)

    def _pick(self, space: Space, head: str) -> tuple[VectorSpace | None, str | None]:
        """The index a query searches (see the module docstring for the semantic head policy)."""
        if space is Space.VISUAL:
            return self._visual, None
        held = [h for h, s in self._semantic.items() if s.ntotal > 0]
        if head:
            if head in self._semantic and self._semantic[head].ntotal > 0:
                return self._semantic[head], head
            if held:
                raise FailedPrecondition(
                    f"shard {self.shard!r} holds semantic vectors of head {_join(held)}, none of head {head!r} "
                    "that the query was projected with; project the query with the shard's head or re-index "
                    "the shard with the new head"
                )
            return None, head
        if len(held) == 1:
            return self._semantic[held[0]], held[0]
        if not held:
            return None, None
        raise FailedPrecondition(
            f"shard {self.shard!r} holds semantic vectors of several heads ({_join(held)}); "
            "set semantic_head to the head the query was projected with"
        )

    def get(self, ids: Sequence[str], include_vectors: bool = False) -> tuple[list[StoredRecord], list[str]]:
        """Stored records in request order, and the requested ids that are not stored."""
        self._check_open()
        self._check_batch(len(ids), "ids")
        found = self._store.fetch_ids(ids, include_vectors)
        return [found[i] for i in ids if i in found], [i for i in ids if i not in found]

    def scan(self, page_size: int = 0, page_token: str = "", skip_semantic_head: str = "") -> ScanPage:
        """One page of stored records with vectors and re-projection signals, in a stable order (by label).

        Records whose semantic head is skip_semantic_head are left out, so a re-projection that stopped part
        way can start again from the first page and only see what is left.
        """
        self._check_open()
        if page_size > SCAN_MAX_PAGE or page_size < 0:
            raise InvalidArgument(f"page_size must be between 1 and {SCAN_MAX_PAGE}, got {page_size}")
        size = page_size or SCAN_DEFAULT_PAGE
        after = self._page_position(page_token) if page_token else 0
        # One more than asked: a page that ends exactly at the last record then says there is no next page.
        records = self._store.scan(after, size + 1, skip_semantic_head)
        if len(records) <= size:
            return ScanPage(records=records, next_page_token="")
        records = records[:size]
        return ScanPage(records=records, next_page_token=self._page_token(records[-1].label))

    def _page_mac(self, label: int) -> str:
        # Keyed by the shard's uuid: a token of another shard (or a mangled one) fails instead of silently
        # skipping or repeating records. Tokens stay valid across restarts, so a re-projection can resume.
        key = self._store.shard_uuid.encode()
        return hmac.new(key, f"scan:{label}".encode(), hashlib.sha256).hexdigest()[:16]

    def _page_token(self, label: int) -> str:
        return f"{label}.{self._page_mac(label)}"

    def _page_position(self, token: str) -> int:
        label = token.partition(".")[0]
        # Labels are positive int64s; the whole token is rebuilt and compared, so only the exact form issued passes.
        if label.isascii() and label.isdigit() and len(label) <= 19:
            issued = self._page_token(int(label))
            if hmac.compare_digest(issued.encode(), token.encode()):
                return int(label)
        raise InvalidArgument("page_token was not issued by this shard; start again with an empty page_token")

    def stats(self) -> ShardStats:
        with self._lock.read():
            return ShardStats(
                shard=self.shard,
                count=len(self._slots),
                visual_count=self._visual.ntotal,
                visual_dim=self.settings.visual_dim,
                semantic_dim=self.settings.semantic_dim,
                semantic_heads={h: s.ntotal for h, s in sorted(self._semantic.items())},
                index_type=self.kind.name,
                last_snapshot_unix_ms=self._snapshot_ms,
                wal_entries=self._wal,
            )

    # --- snapshots ---

    def snapshot_age_seconds(self) -> float:
        since = self._snapshot_ms / 1000 if self._snapshot_ms else self._opened
        return max(0.0, time.time() - since)

    def snapshot(self, force: bool = False) -> bool:
        """Write a snapshot if anything changed since the last one (or if forced); True if one was written."""
        with self._snapshot_mutex:
            with self._lock.read():
                seq = self._applied_seq
                if not force and not self._snapshot_needed and seq == self._snapshot_seq:
                    return False
                visual = self._visual.copy_cpu()
                semantic = {h: s.copy_cpu() for h, s in self._semantic.items()}
            t0 = time.perf_counter()
            snap = snapshot.write(
                self.directory,
                seq=seq,
                shard_uuid=self._store.shard_uuid,
                index_type=self.kind.name,
                visual_dim=self.settings.visual_dim,
                semantic_dim=self.settings.semantic_dim,
                visual=visual,
                semantic=semantic,
            )
            with self._write_mutex:
                remaining = self._store.prune_changes(seq)
                with self._lock.write():
                    self._snapshot_seq, self._snapshot_ms, self._wal = seq, snap.created_ms, remaining
                    self._snapshot_needed = False
                    self._publish_locked()
            log.info(
                "snapshot written",
                extra={"shard": self.shard, "seq": seq, "seconds": round(time.perf_counter() - t0, 3)},
            )
            return True

    def _snapshot_due(self) -> bool:
        if self._snapshot_needed or self._wal >= self.settings.snapshot_every:
            return True
        return self._wal > 0 and self.snapshot_age_seconds() >= self.settings.snapshot_interval_seconds

    def _snapshot_loop(self) -> None:
        interval = self.settings.snapshot_interval_seconds
        while not self._stop.is_set():
            if self._snapshot_due():
                try:
                    self.snapshot()
                except Exception:
                    log.exception("snapshot failed; will retry", extra={"shard": self.shard})
                    # Back off, or a persistent failure (disk full) would spin.
                    self._stop.wait(min(interval, 30.0))
                    continue
            wait = interval - self.snapshot_age_seconds() if self._wal > 0 else interval
            self._wake.wait(timeout=max(0.05, wait))
            self._wake.clear()

    def close(self, final_snapshot: bool = True) -> None:
        """Stop the snapshot thread, write a final snapshot (unless told not to) and close the database."""
        if self._closed:
            return
        self._stop.set()
        self._wake.set()
        self._thread.join()
        try:
            if final_snapshot:
                self.snapshot()
        finally:
            with self._write_mutex:
                self._closed = True
                self._store.close()
            # The gauge's callback would keep this closed shard (and its indexes) alive: freeze its last value.
            age = self.snapshot_age_seconds()
            metrics.SNAPSHOT_AGE.labels(self.shard).set_function(lambda: age)

    # --- metrics ---

    def _publish(self) -> None:
        with self._lock.read():
            self._publish_locked()

    def _publish_locked(self) -> None:
        metrics.VECTORS.labels(self.shard, Space.VISUAL.value).set(self._visual.ntotal)
        metrics.VECTORS.labels(self.shard, Space.SEMANTIC.value).set(sum(s.ntotal for s in self._semantic.values()))
        metrics.WAL_ENTRIES.labels(self.shard).set(self._wal)
