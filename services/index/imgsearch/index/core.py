"""ShardIndex: one shard of the image index, durable in SQLite and searched with FAISS (plain Python, no gRPC).

Spaces. Each image may have a `visual` vector (CNN features) and semantic vectors (projections into the
text-embedding space), at most one per projection head (name@version). All are L2-normalised on the way in, so
inner product is cosine similarity. There is one FAISS index for the visual space and one per semantic head:
vectors of different heads live in different spaces and must never be ranked together. A record holds the
vectors of several heads at once while a new head is built ("build, then flip": the gateway dual-writes the
active and the building head, backfills stored images with SetSemantic, and flips once every shard reports the
new head complete).

Head configuration. Each shard durably keeps the cluster's HeadConfig (epoch, active, building). A newer epoch
replaces it, an older or equal one is ignored, so concurrent gateways converge on the highest. Once configured
(epoch > 0), every upserted record must carry a vector of each configured head: a writer with a stale view gets
FAILED_PRECONDITION for that record, refreshes and retries, so no record slips into the shard without the
building head's vector after the backfill passed it.

Semantic head policy. A semantic query names the head it was projected with and searches only that head's
index; a head the shard holds no vectors of is an empty space (zero hits, not an error: during a build a shard
may not have any yet). An empty head means the configuration's active head; with no configuration, the shard's
only head, and FAILED_PRECONDITION when it holds several. The per-head index (rather than one index plus an id
selector) keeps each search exact and as small as the head's share, and lets approximate kinds train per head.

Writes (writes.py). Validate each record on its own (a bad one gets an error, the others go ahead), commit the
whole request to SQLite in one fsynced transaction, then apply it to FAISS under a short exclusive lock. Writers
are serialised by their own mutex, which also guards the head configuration, so the in-memory id map always
equals SQLite once a write returns and every upsert is checked against the configuration in force.

Reads. Searches hold a shared lock while FAISS runs (FAISS releases the GIL, so searches run in parallel on
CPU) and fetch hit metadata from SQLite afterwards: labels are never reused, so a hit's label still names the
same id; a record deleted in between is dropped from the hits rather than returned stale.

Snapshots (snapshots.py) and start-up (recovery.py). A background thread writes a snapshot after
`snapshot_every` changes or `snapshot_interval_seconds` (and close() writes a final one). Start-up loads the
newest valid snapshot and replays the changes after its seq from SQLite; a missing, corrupt or inconsistent
snapshot means a full rebuild from SQLite, which holds every acknowledged write.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Sequence

from imgsearch.index import metrics, recovery
from imgsearch.index.ann import SegmentedSpace
from imgsearch.index.builder import Builder
from imgsearch.index.indexes import INDEX_KINDS, Labels, gpu_count
from imgsearch.index.scan import PageTokens, ScanPage
from imgsearch.index.settings import IndexSettings
from imgsearch.index.snapshots import Snapshots
from imgsearch.index.state import Memory
from imgsearch.index.store import DeleteOp, Op, Store, StoredRecord, UpsertOp
from imgsearch.index.types import (
    SCAN_DEFAULT_PAGE,
    SCAN_MAX_PAGE,
    Cursor,
    HeadConfig,
    HeadState,
    Hit,
    LoadReport,
    RecordInput,
    SearchFilter,
    SearchResult,
    SemanticInput,
    ShardStats,
    Space,
    Vector,
    WriteResult,
)
from imgsearch.index.validation import Validator, check_required_heads, join_heads, unit
from imgsearch.index.writes import resolve
from imgsearch.kit.convert import check_k
from imgsearch.kit.errors import (
    FailedPrecondition,
    ImgsearchError,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unavailable,
)
from imgsearch.kit.locks import RWLock, WouldBlock

__all__ = [
    "Cursor",
    "HeadConfig",
    "HeadState",
    "Hit",
    "LoadReport",
    "RecordInput",
    "ScanPage",
    "SearchFilter",
    "SearchResult",
    "SemanticInput",
    "ShardIndex",
    "ShardStats",
    "Space",
    "Vector",
    "WriteResult",
]

log = logging.getLogger(__name__)

# Searches run on the event loop (search_now) scan at most this many vector components exactly (about 1,500
# visual or 5,000 semantic vectors: a few hundred microseconds) and ask for at most this many hits.
INLINE_MAX_SCAN = 2_000_000
INLINE_MAX_K = 100
RERANK_PER_HIT = 4
# A cursor page of a re-ranked (PQ) space re-ranks at most this many candidates to make sure of its order.
PAGE_RERANK_MAX = 20_000


def _cheap(index: SegmentedSpace) -> bool:
    """Whether searching this space is microseconds: a small exact tail, and no base or an HNSW one (an IVF-PQ
    base re-ranks its candidates from SQLite: milliseconds)."""
    if index.tail.ntotal * index.dim > INLINE_MAX_SCAN:
        return False
    return index.base is None or index.base.kind == "HNSW"


class ShardIndex:
    """One shard: validated writes, durable storage, exact inner-product search per space and head."""

    def __init__(self, settings: IndexSettings) -> None:
        self.settings = settings
        self.shard = settings.shard
        self.kind = INDEX_KINDS[settings.index_type]
        self.use_gpu = settings.use_gpu and gpu_count() > 0
        self.directory = settings.shard_dir
        self._store = Store(self.directory, settings.visual_dim, settings.semantic_dim)
        self._validator = Validator(settings)
        self._tokens = PageTokens(self._store.shard_uuid)
        self._lock = RWLock()
        self._write_mutex = threading.Lock()
        self._memory = Memory(settings, self.kind, self.use_gpu, self._store.path)
        self._closed = False
        try:
            self._config = self._store.head_config()
            self._last_semantic_ms = self._store.last_semantic_write_ms()
            self.load_report: LoadReport = recovery.load(self._memory, self._store, self.directory, self.shard)
        except BaseException:
            self._store.close()
            raise
        self._snapshots = Snapshots(
            self._memory, self._store, self.directory, self._lock, self._write_mutex, self.shard, self._publish_locked
        )
        self._builder = Builder(
            self._memory, self._store, self._lock, self.shard, settings.build_nice, on_swap=self._publish_locked
        )
        self._publish()
        metrics.SNAPSHOT_AGE.labels(self.shard).set_function(self.snapshot_age_seconds)
        # Zero-valued series from the start, so dashboards and rate() see them before traffic.
        for op in ("upsert", "delete", "set_semantic"):
            metrics.WRITES.labels(self.shard, op)
        for space in Space:
            # Labelled by the kind a search used (SegmentedSpace.served_kind): exact ("Flat") until a base is built.
            metrics.SEARCH_SECONDS.labels(self.shard, space.value, "Flat")
        self._snapshots.start()
        if settings.background_build:
            self._builder.start()
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
                "head_epoch": self._config.epoch,
            },
        )

    # --- writes ---

    def upsert(self, records: Sequence[RecordInput]) -> list[WriteResult]:
        """Insert or replace records by id (all their heads' vectors); each result says changed=True for a new id.

        With a head configuration in force, a record lacking a vector of a configured head fails alone with
        FAILED_PRECONDITION (checked under the write mutex, against the configuration the write commits under).
        """
        self._check_open()
        self._validator.check_batch(len(records), "records")
        results: list[WriteResult | None] = [None] * len(records)
        valid: list[tuple[int, UpsertOp]] = []
        for i, (rec, checked) in enumerate(zip(records, self._validator.records(records), strict=True)):
            if isinstance(checked, ImgsearchError):
                results[i] = WriteResult(id=rec.id, error=checked)
            else:
                valid.append((i, checked))

        def admit(config: HeadConfig) -> list[int]:
            admitted: list[int] = []
            for n, (i, op) in enumerate(valid):
                try:
                    check_required_heads(i, op, config)
                    admitted.append(n)
                except ImgsearchError as exc:
                    results[i] = WriteResult(id=op.id, error=exc)
            return admitted

        admitted, changed = self._write([op for _, op in valid], admit)
        for n, c in zip(admitted, changed, strict=True):
            i = valid[n][0]
            results[i] = WriteResult(id=records[i].id, changed=c)
        metrics.WRITES.labels(self.shard, "upsert").inc(len(admitted))
        return [r for r in results if r is not None]

    def delete(self, ids: Sequence[str]) -> list[WriteResult]:
        """Delete records by id; changed=True when the id existed."""
        self._check_open()
        self._validator.check_batch(len(ids), "ids")
        results: list[WriteResult | None] = [None] * len(ids)
        ops: list[Op] = []
        where: list[int] = []
        for i, id_ in enumerate(ids):
            try:
                self._validator.check_id(id_, f"id {i}")
                ops.append(DeleteOp(id=id_))
                where.append(i)
            except ImgsearchError as exc:
                results[i] = WriteResult(id=id_, error=exc)
        _, changed = self._write(ops)
        for i, c in zip(where, changed, strict=True):
            results[i] = WriteResult(id=ids[i], changed=c)
        metrics.WRITES.labels(self.shard, "delete").inc(sum(changed))
        return [r for r in results if r is not None]

    def set_semantic(self, updates: Sequence[SemanticInput]) -> list[WriteResult]:
        """Add or replace one head's semantic vector of stored records; an id not stored fails alone (NOT_FOUND).

        The record's vectors of other heads and everything else of it stay (visual vector, metadata, source,
        creation time, re-projection signals). changed=True for every update applied.
        """
        self._check_open()
        self._validator.check_batch(len(updates), "updates")
        results: list[WriteResult | None] = [None] * len(updates)
        ops: list[Op] = []
        where: list[int] = []
        for i, update in enumerate(updates):
            try:
                ops.append(self._validator.semantic(i, update))
                where.append(i)
            except ImgsearchError as exc:
                results[i] = WriteResult(id=update.id, error=exc)
        _, applied = self._write(ops)
        for i, found in zip(where, applied, strict=True):
            id_ = updates[i].id
            if found:
                results[i] = WriteResult(id=id_, changed=True)
            else:
                # Deleted since the caller read it (e.g. between a Scan page and this update): nothing to replace.
                results[i] = WriteResult(id=id_, error=NotFound(f"update {i} ({id_!r}): no record with this id"))
        metrics.WRITES.labels(self.shard, "set_semantic").inc(sum(applied))
        return [r for r in results if r is not None]

    def _write(
        self, candidates: Sequence[Op], admit: Callable[[HeadConfig], list[int]] | None = None
    ) -> tuple[list[int], list[bool]]:
        """Commit the admitted candidates (all without `admit`) and apply them; their indexes and changed flags."""
        if not candidates:
            return [], []
        with self._write_mutex:
            self._check_open()
            admitted = admit(self._config) if admit is not None else list(range(len(candidates)))
            ops = [candidates[n] for n in admitted]
            if not ops:
                return [], []
            outcome = self._store.write(ops)
            delta, changed = resolve(ops, outcome.labels, outcome.last_seq, self._memory.ids, self._memory.slots)
            # Committed: if applying fails now (only out of memory can do that), SQLite still has the write and
            # the next start rebuilds FAISS from it; the caller sees an error and may retry (upserts are idempotent).
            with self._lock.write():
                self._memory.apply(delta)
                if outcome.semantic_ms:
                    self._last_semantic_ms = outcome.semantic_ms
                self._publish_locked()
        self._snapshots.poke()
        self._builder.poke()
        return admitted, changed

    # --- head configuration ---

    def head_state(self) -> HeadState:
        """The configuration in force and how complete each head's space is (configured heads listed even at 0)."""
        self._check_open()
        with self._lock.read():
            config = self._config
            counts = self._memory.head_counts()
            for head in config.required():
                counts.setdefault(head, 0)
            return HeadState(
                config=config,
                records=len(self._memory.slots),
                vectors_per_head=dict(sorted(counts.items())),
                last_semantic_write_unix_ms=self._last_semantic_ms,
                shard=self.shard,
            )

    def set_head_config(self, config: HeadConfig) -> HeadState:
        """Store the configuration durably if its epoch is newer than the one in force; returns the state after.

        An older or equal epoch leaves the stored configuration alone (no error): the returned state shows which
        one is in force, so a caller that lost to a newer configuration can tell.
        """
        self._check_open()
        self._validator.head_config(config)
        with self._write_mutex:
            self._check_open()
            in_force = self._store.set_head_config(config)
            with self._lock.write():
                if in_force != self._config:
                    log.info(
                        "head configuration changed",
                        extra={
                            "shard": self.shard,
                            "epoch": in_force.epoch,
                            "active": in_force.active,
                            "building": in_force.building,
                        },
                    )
                self._config = in_force
        return self.head_state()

    # --- reads ---

    def search(
        self,
        space: Space,
        query: Vector,
        k: int,
        exclude_ids: Sequence[str] = (),
        semantic_head: str = "",
        where: SearchFilter | None = None,
        min_score: float | None = None,
        after: Cursor | None = None,
        wait: bool = True,
    ) -> SearchResult:
        """The k stored vectors of one space with the highest inner product with the normalised query.

        `where` restricts the search to matching records (inside the index search, so k is filled whenever k
        records match; none matching is an empty answer). `min_score` drops hits scoring below it. `after` is a
        paging cursor: only hits ranked strictly after it by (score desc, id asc) are returned.
        `wait=False` (see search_now): raise WouldBlock instead of waiting for the lock or scanning much.
        """
        self._check_open()
        check_k(k, self.settings.max_k)
        if len(exclude_ids) > self.settings.max_exclude_ids:
            raise ResourceExhausted(f"{len(exclude_ids)} exclude_ids, at most {self.settings.max_exclude_ids} allowed")
        dim = self.settings.visual_dim if space is Space.VISUAL else self.settings.semantic_dim
        q = unit(query, dim, f"query for the {space.value} space")[None, :]
        if where is not None:
            self._validator.search_filter(where)
            if where.empty:
                where = None
        t0 = time.perf_counter()
        allowed = None
        if where is not None:
            allowed = self._store.filter_labels(where.terms, where.created_after_ms, where.created_before_ms)
        with self._lock.read(wait):
            index, head = self._pick(space, semantic_head)
            if index is None or index.ntotal == 0:
                return SearchResult(hits=[], searched=0, space=space, head=head)
            if not wait and not _cheap(index):
                raise WouldBlock
            searched = index.ntotal
        if allowed is not None and allowed.shape[0] == 0:
            return SearchResult(hits=[], searched=searched, space=space, head=head)
        hits = self._ranked(index, q, k, exclude_ids, where, allowed, min_score, after, wait)
        kind = index.served_kind
        metrics.SEARCH_SECONDS.labels(self.shard, space.value, kind).observe(time.perf_counter() - t0)
        return SearchResult(hits=hits, searched=searched, space=space, head=head)

    def _ranked(
        self,
        index: SegmentedSpace,
        q: Vector,
        k: int,
        exclude_ids: Sequence[str],
        where: SearchFilter | None,
        allowed: Labels | None,
        min_score: float | None,
        after: Cursor | None,
        wait: bool = True,
    ) -> list[Hit]:
        """Search with a growing depth until k hits pass the cursor, min_score and exclusions (or none are left)."""
        want = k
        while True:
            with self._lock.read(wait):
                slots = self._memory.slots
                ids = self._memory.ids
                excluded = {ids[i] for i in exclude_ids if i in ids}
                total = index.ntotal
                depth = min(want + len(excluded), total)
                rerank = index.reranks
                # PQ candidates: at least `rerank` of them, and a few per hit asked for (a page of 200 from 300
                # candidates missed a fifth of the true 200 in tests/unit/test_index_ann.py).
                deep = max(RERANK_PER_HIT * depth, self.settings.rerank) if rerank else depth
                scores, labels = index.search(q, min(deep, total), allowed, exact=after is not None, rescored=rerank)
                # Python ints and floats first: per-element numpy scalars cost several times more.
                named = [
                    (lb, sc, slots[lb].id)
                    for sc, lb in zip(scores.tolist(), labels.tolist(), strict=True)
                    if lb in slots and lb not in excluded
                ]
            # Below this PQ score no row was re-ranked; their exact scores are at most floor + the PQ error. Only a
            # cursor page uses them (below), so other searches do not pay for them.
            floor, error = math.inf, 0.0
            if rerank and named:
                approx = {lb: sc for lb, sc, _ in named} if after is not None else {}
                named = self._rescored(named, q[0])
                if approx:
                    floor = min(approx.values())
                    error = max((abs(sc - approx[lb]) for lb, sc, _ in named), default=0.0)
            named.sort(key=lambda t: (-t[1], t[2]))
            exhausted = depth >= total or len(scores) < min(deep, total)
            passing = [
                t
                for t in named
                if (min_score is None or t[1] >= min_score) and (after is None or after.before(t[1], t[2]))
            ]
            last_low = bool(named) and min_score is not None and named[-1][1] < min_score
            # A page after a cursor must hold every row that ranks in it, or that row falls between pages: with PQ
            # candidates that is only sure once the page's last exact score clears what any row left out could
            # score (the largest PQ error seen here stands in for the bound; deeper until then, within a cap).
            unsure = (
                after is not None
                and rerank
                and len(passing) >= k
                and passing[k - 1][1] < floor + error
                and deep < PAGE_RERANK_MAX
            )
            if (len(passing) >= k and not unsure) or exhausted or last_low:
                break
            want *= 4
        ranked = passing[:k]
        found = self._store.hit_records([label for label, _, _ in ranked])
        return [
            Hit(id=rec.id, score=score, metadata=rec.metadata, source_name=rec.source_name)
            for label, score, _ in ranked
            if (rec := found.get(label)) is not None and (where is None or where.matches(rec.metadata, rec.created_ms))
        ]

    def search_now(
        self,
        space: Space,
        query: Vector,
        k: int,
        exclude_ids: Sequence[str] = (),
        semantic_head: str = "",
        where: SearchFilter | None = None,
        min_score: float | None = None,
        after: Cursor | None = None,
    ) -> SearchResult | None:
        """search() on the calling thread (the server's event loop) when it costs microseconds: an HNSW base or
        a small exact scan, no filter or cursor, k <= INLINE_MAX_K; None when it would not, or would have to
        wait for the shard's lock (a write or snapshot copy in progress), so the caller runs search() on a worker.

        A thread hop costs more than such a search itself (docs/benchmarks.md); long scans, IVF-PQ re-ranking
        from SQLite and anything that waits stay off the loop, so health checks and other calls never stall.
        """
        if where is not None or after is not None or k > INLINE_MAX_K or len(exclude_ids) > INLINE_MAX_K:
            return None
        try:
            return self.search(space, query, k, exclude_ids, semantic_head, None, min_score, None, wait=False)
        except WouldBlock:
            return None

    def _rescored(self, named: list[tuple[int, float, str]], q: Vector) -> list[tuple[int, float, str]]:
        """Approximate (PQ) candidates re-scored exactly from their stored float16 vectors: one SQLite read and
        one matrix-vector product (a candidate deleted since the search is dropped)."""
        labels, vectors = self._store.visual_matrix([lb for lb, _, _ in named])
        if not labels:
            return []
        ids = {lb: i for lb, _, i in named}
        scores = (vectors @ q).tolist()
        return [(lb, sc, ids[lb]) for lb, sc in zip(labels, scores, strict=True)]

    def _pick(self, space: Space, head: str) -> tuple[SegmentedSpace | None, str | None]:
        """The index a query searches (see the module docstring for the semantic head policy)."""
        memory = self._memory
        if space is Space.VISUAL:
            return memory.visual, None
        head = head or self._config.active
        if head:
            return memory.semantic.get(head), head
        held = [h for h, s in memory.semantic.items() if s.ntotal > 0]
        if len(held) == 1:
            return memory.semantic[held[0]], held[0]
        if not held:
            return None, None
        raise FailedPrecondition(
            f"shard {self.shard!r} holds semantic vectors of several heads ({join_heads(held)}) and has no head "
            "configuration; set semantic_head to the head the query was projected with"
        )

    def _prefer(self) -> tuple[str, ...]:
        """Heads shown first in the legacy single-head fields of records read."""
        return (self._config.active, self._config.building)

    def get(self, ids: Sequence[str], include_vectors: bool = False) -> tuple[list[StoredRecord], list[str]]:
        """Stored records in request order, and the requested ids that are not stored."""
        self._check_open()
        self._validator.check_batch(len(ids), "ids")
        found = self._store.fetch_ids(ids, include_vectors, self._prefer())
        return [found[i] for i in ids if i in found], [i for i in ids if i not in found]

    def thumbnails(self, ids: Sequence[str]) -> dict[str, bytes]:
        """The stored thumbnails of these ids (ids without one are left out)."""
        self._check_open()
        self._validator.check_batch(len(ids), "ids")
        return self._store.thumbnails(ids)

    def scan(self, page_size: int = 0, page_token: str = "", skip_semantic_head: str = "") -> ScanPage:
        """One page of stored records with vectors and re-projection signals, in a stable order (by label).

        Records that already have a vector of skip_semantic_head are left out, so a backfill that stopped part
        way can start again from the first page and only see what is left.
        """
        self._check_open()
        if page_size > SCAN_MAX_PAGE or page_size < 0:
            raise InvalidArgument(f"page_size must be between 1 and {SCAN_MAX_PAGE}, got {page_size}")
        size = page_size or SCAN_DEFAULT_PAGE
        after = self._tokens.position(page_token) if page_token else 0
        # One more than asked: a page that ends exactly at the last record then says there is no next page.
        records = self._store.scan(after, size + 1, skip_semantic_head, self._prefer())
        if len(records) <= size:
            return ScanPage(records=records, next_page_token="")
        records = records[:size]
        return ScanPage(records=records, next_page_token=self._tokens.issue(records[-1].label))

    def stats(self) -> ShardStats:
        with self._lock.read():
            memory = self._memory
            return ShardStats(
                shard=self.shard,
                count=len(memory.slots),
                visual_count=memory.visual.ntotal,
                visual_dim=self.settings.visual_dim,
                semantic_dim=self.settings.semantic_dim,
                semantic_heads=memory.head_counts(),
                index_type=self.kind.name,
                last_snapshot_unix_ms=memory.snapshot_ms,
                wal_entries=memory.wal,
                served_index_types={
                    "visual": memory.visual.served_kind,
                    **{f"semantic:{h}": sp.served_kind for h, sp in memory.semantic.items()},
                },
                exact_tail={
                    "visual": memory.visual.tail.ntotal,
                    **{f"semantic:{h}": sp.tail.ntotal for h, sp in memory.semantic.items()},
                },
            )

    # --- snapshots and lifecycle ---

    def snapshot_age_seconds(self) -> float:
        return self._snapshots.age_seconds()

    def build_indexes(self) -> int:
        """Build every approximate index that is due now, on the calling thread (tests, benchmarks)."""
        return self._builder.run_once()

    def snapshot(self, force: bool = False) -> bool:
        """Write a snapshot if anything changed since the last one (or if forced); True if one was written."""
        return self._snapshots.write(force)

    def close(self, final_snapshot: bool = True) -> None:
        """Stop the snapshot thread, write a final snapshot (unless told not to) and close the database."""
        if self._closed:
            return
        self._builder.stop()
        self._snapshots.stop()
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

    def _check_open(self) -> None:
        if self._closed:
            raise Unavailable(f"shard {self.shard!r} is shut down")

    # --- metrics ---

    def _publish(self) -> None:
        with self._lock.read():
            self._publish_locked()

    def _publish_locked(self) -> None:
        memory = self._memory
        metrics.VECTORS.labels(self.shard, Space.VISUAL.value).set(memory.visual.ntotal)
        metrics.VECTORS.labels(self.shard, Space.SEMANTIC.value).set(sum(s.ntotal for s in memory.semantic.values()))
        metrics.UNINDEXED.labels(self.shard, Space.VISUAL.value).set(memory.visual.unindexed)
        metrics.UNINDEXED.labels(self.shard, Space.SEMANTIC.value).set(
            sum(s.unindexed for s in memory.semantic.values())
        )
        metrics.WAL_ENTRIES.labels(self.shard).set(memory.wal)
