"""Approximate vector spaces: an exact tail plus an immutable approximate base, built in the background and swapped.

A SegmentedSpace answers like one index over int64 labels:
- the **tail** is the exact kind (IDMap2,Flat): every write goes there, deletes remove from it in place;
- the **base** is an approximate index (HNSW over float16, IVF-PQ, or IVF-PQ with 4-bit fast-scan codes) over rows
  0..n-1 with a row -> label map.
  It is never modified after it is built: a delete or replacement of a label held in the base clears its bit in
  the `alive` bitmap, which every base search passes to FAISS as an IDSelector (so k is still filled).

A small space is only a tail (exact). Once the tail of a space whose kind is approximate reaches `ann_min_vectors`
(or, with a base, `max(ann_merge_min, ann_merge_ratio * base)`), the builder (builder.py) makes a new base from
the old one plus the tail off the lock (HNSW: clone and add; a full rebuild when a quarter of the base is dead or,
for IVF-PQ, when the base outgrew its training set four times), then swaps it in under the exclusive lock while the
old one kept serving. Labels touched during the build are recorded and come out of the new base on swap.

Filters: a search may carry the sorted labels it is restricted to. A base search then passes a bitmap of the
allowed live rows; when few rows are allowed (<= brute_limit), or the approximate search returned fewer than
min(k, allowed) hits, the allowed rows are scored exactly from the base's own storage instead, so a selective
filter still fills k whenever k records match.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import faiss
import numpy as np
import numpy.typing as npt

from imgsearch.index.indexes import IndexKind, Labels, Matrix, VectorSpace, contents

log = logging.getLogger(__name__)

Scores = npt.NDArray[np.float32]

# Kinds a space may be configured with: exact only, or exact tail + approximate base.
SPACE_KINDS = ("Flat", "HNSW", "IVFPQ", "IVFPQFS")
# Kinds whose base scores are PQ approximations: the shard re-ranks their candidates from the stored vectors.
IVF_KINDS = ("IVFPQ", "IVFPQFS")
APPROXIMATE_KINDS = ("HNSW", *IVF_KINDS)


@dataclass(frozen=True)
class AnnParams:
    min_vectors: int = 50_000
    merge_min: int = 10_000
    # The exact tail holds a full-size copy of each vector (3.3 KB per record for both spaces in the default SQfp16,
    # 6.5 KB in Flat): kept to 5 % of the base so that it costs at most ~170 B per record on top of the base
    # (docs/benchmarks.md, RAM per image).
    merge_ratio: float = 0.05
    # Once writes stopped (the builder's call: IndexSettings.ann_idle_merge_seconds), a tail of at least
    # idle_merge_min vectors is merged too: every search scans the tail exactly (12k visual vectors: 3.3 ms a
    # query on one core, more than the fast-scan base of 500k), while a bulk load keeps the large thresholds
    # above, so merges stay rare while it writes.
    idle_merge_min: int = 1_000
    # While a bulk load streams in (the builder's call: IndexSettings.ann_bulk_write_rate), builds wait until it
    # pauses or a tail reaches this size: on 2 vCPUs a build cannot keep pace with a bulk load anyway, and running
    # it during the load cost the load a fifth of its rate (docs/benchmarks.md, "Upsert at 1M").
    bulk_tail_max: int = 500_000
    rebuild_dead_fraction: float = 0.25
    hnsw_m: int = 32
    # efConstruction 128 / efSearch 256 gave recall@10 0.996 (synthetic) and 1.000 (MiniLM captions) at 100k, where
    # 64 / 64 gave 0.78 / 0.99; at 500k per shard the hard synthetic queries need efSearch 320 (0.964-0.976) and
    # nprobe 96-192 (IVF-PQ 0.953 at 96; fast-scan 0.973 at 96, 0.989 at 192), measured in docs/benchmarks.md.
    hnsw_ef_construction: int = 128
    hnsw_ef_search: int = 320
    ivf_nprobe: int = 192
    pq_dims_per_code: int = 8
    brute_limit: int = 20_000
    build_threads: int = 1


@dataclass
class Base:
    """An approximate index over rows 0..n-1 (immutable once built) and its row -> label map."""

    kind: str
    index: Any
    row_labels: Labels
    # Rows at the last (re)training: IVF-PQ retrains once the base outgrew that four times.
    trained_rows: int
    # Set once written into a snapshot, so that later snapshots link the file instead of writing it again.
    files: dict[str, Any] = field(default_factory=dict)

    @property
    def rows(self) -> int:
        return int(self.row_labels.shape[0])


def _pq_m(dim: int, dims_per_code: int) -> int:
    """The number of PQ sub-quantizers: a divisor of dim near dim / dims_per_code."""
    target = max(1, dim // max(1, dims_per_code))
    for delta in range(dim):
        for m in (target - delta, target + delta):
            if 1 <= m <= dim and dim % m == 0:
                return m
    return 1


def new_base_index(kind: str, dim: int, train: Matrix, params: AnnParams) -> Any:
    """An empty, trained approximate index of this kind."""
    index: Any
    if kind == "HNSW":
        qt: Any = faiss.ScalarQuantizer.QT_fp16
        index = faiss.IndexHNSWSQ(dim, qt, params.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = params.hnsw_ef_construction
        index.train(train)
        return index
    if kind in IVF_KINDS:
        n = train.shape[0]
        nlist = max(1, min(int(math.sqrt(n)), n // 39 if n >= 39 else 1, 4096))
        if kind == "IVFPQFS":
            # 4-bit codes scanned with SIMD from registers (FAISS "fast scan"): twice the sub-quantizers of 8-bit PQ
            # in the same bytes per vector, and 5-8x less CPU per scanned code, so the same share of the lists
            # is probed for far less CPU (docs/benchmarks.md, "Fast-scan visual base").
            m = _pq_m(dim, max(1, params.pq_dims_per_code // 2))
            factory = f"IVF{nlist},PQ{m}x4fs"
        else:
            m = _pq_m(dim, params.pq_dims_per_code)
            # 8 bits per code unless the training set is too small for 256 centroids per sub-quantizer.
            nbits = 8 if n >= 39 * 256 else 4
            # "np": no polysemous training (a code permutation for Hamming pre-filtering, which these searches
            # never use); it was 20 of the 21 s of a 3,000-row build and grows with the number of sub-quantizers.
            factory = f"IVF{nlist},PQ{m}x{nbits}np"
        index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
        sample = train
        if n > 64 * nlist:
            pick = np.random.default_rng(0).choice(n, 64 * nlist, replace=False)
            sample = train[np.sort(pick)]
        index.train(sample)
        return index
    raise ValueError(f"unknown approximate kind {kind!r}")


def build_base(kind: str, dim: int, vectors: Matrix, labels: Labels, params: AnnParams, old: Base | None) -> Base:
    """A new base: `old` (cloned, so the old one keeps serving) plus these rows, or a fresh one when old is None."""
    x = np.ascontiguousarray(vectors, dtype=np.float32)
    if old is None:
        index = new_base_index(kind, dim, x, params)
        row_labels = np.asarray(labels, dtype=np.int64)
        trained = int(x.shape[0])
    else:
        index = faiss.clone_index(old.index)
        row_labels = np.concatenate([old.row_labels, np.asarray(labels, dtype=np.int64)])
        trained = old.trained_rows
    index.add(x)
    if kind == "IVFPQ":
        # For _brute's reconstruct. Fast-scan bases never reconstruct (see _scan).
        faiss.extract_index_ivf(index).make_direct_map()
    return Base(kind=kind, index=index, row_labels=row_labels, trained_rows=trained)


def _bitmap(mask: npt.NDArray[np.bool_]) -> npt.NDArray[np.uint8]:
    return np.packbits(mask, bitorder="little")


class SegmentedSpace:
    """One vector space: exact tail + optional approximate base (see the module docstring). Callers hold the locks."""

    def __init__(
        self,
        kind: str,
        exact: IndexKind,
        dim: int,
        use_gpu: bool,
        params: AnnParams,
        tail_index: Any | None = None,
        search_threads: int = 1,
    ) -> None:
        self.kind = kind
        self.dim = dim
        self.params = params
        self.search_threads = search_threads
        self.tail = VectorSpace(exact, dim, use_gpu, tail_index, search_threads)
        self.base: Base | None = None
        self.alive: npt.NDArray[np.bool_] = np.zeros(0, dtype=bool)
        self.alive_count = 0
        # label -> base row (-1: none), indexed by label.
        self.row_of: npt.NDArray[np.int32] = np.zeros(0, dtype=np.int32)
        # Labels removed while a build runs (None: no build running).
        self.building: set[int] | None = None

    @property
    def approximate(self) -> bool:
        return self.kind != "Flat"

    @property
    def ntotal(self) -> int:
        return self.tail.ntotal + self.alive_count

    @property
    def unindexed(self) -> int:
        """Vectors waiting in the exact tail for the approximate base (0 for an exact space: nothing waits)."""
        return self.tail.ntotal if self.approximate else 0

    @property
    def dead(self) -> int:
        return 0 if self.base is None else self.base.rows - self.alive_count

    @property
    def served_kind(self) -> str:
        """What searches of this space use now: the base's kind once built, else exact."""
        return self.base.kind if self.base is not None else "Flat"

    @property
    def reranks(self) -> bool:
        """Whether base scores are approximate (PQ) and the caller should re-rank from the stored vectors."""
        return self.base is not None and self.base.kind in IVF_KINDS

    # --- base installation ---

    def install(self, base: Base | None, alive: npt.NDArray[np.bool_] | None = None) -> None:
        """Use this base (with this liveness; all rows live when None)."""
        self.base = base
        if base is None:
            self.alive = np.zeros(0, dtype=bool)
            self.row_of = np.zeros(0, dtype=np.int32)
            self.alive_count = 0
            return
        self.alive = np.ones(base.rows, dtype=bool) if alive is None else alive.astype(bool, copy=True)
        top = int(base.row_labels.max()) + 1 if base.rows else 0
        row_of = np.full(top, -1, dtype=np.int32)
        row_of[base.row_labels] = np.arange(base.rows, dtype=np.int32)
        self.row_of = row_of
        self.alive_count = int(self.alive.sum())

    def base_rows(self, labels: Labels) -> npt.NDArray[np.int64]:
        """Live base rows of these labels."""
        if self.base is None or labels.shape[0] == 0:
            return np.zeros(0, dtype=np.int64)
        inside = labels[(labels >= 0) & (labels < self.row_of.shape[0])]
        rows = self.row_of[inside].astype(np.int64)
        rows = rows[rows >= 0]
        out: npt.NDArray[np.int64] = rows[self.alive[rows]]
        return out

    # --- writes ---

    def add(self, labels: Labels, vectors: Matrix) -> None:
        self.tail.add(labels, vectors)

    def remove(self, labels: Labels) -> int:
        if labels.shape[0] == 0:
            return 0
        removed = self.tail.remove(labels)
        if self.building is not None:
            self.building.update(int(x) for x in labels)
        rows = self.base_rows(labels)
        if rows.shape[0]:
            self.alive[rows] = False
            self.alive_count -= int(rows.shape[0])
            removed += int(rows.shape[0])
        return removed

    def sync(self) -> None:
        self.tail.sync()

    def labels(self) -> Labels:
        tail = self.tail.labels()
        if self.base is None:
            return tail
        out: Labels = np.concatenate([tail, self.base.row_labels[self.alive]])
        return out

    def copy_tail(self) -> Any:
        return self.tail.copy_cpu()

    # --- builds ---

    def build_due(self, idle: bool = False, bulk: bool = False) -> str | None:
        """'full', 'merge' or None: whether the builder should make a new base now (idle: no writes lately;
        bulk: a bulk load is streaming in, so builds wait while the tail is below bulk_tail_max)."""
        if not self.approximate or self.building is not None:
            return None
        p = self.params
        if bulk and self.tail.ntotal < p.bulk_tail_max:
            return None
        if self.base is None:
            return "full" if self.tail.ntotal >= p.min_vectors else None
        if self.base.kind != self.kind:
            # Loaded from a snapshot made under another kind: it serves until its replacement is built.
            return "full"
        if self.base.rows and self.dead >= p.rebuild_dead_fraction * self.base.rows:
            return "full"
        if self.base.kind in IVF_KINDS and self.ntotal >= 4 * max(1, self.base.trained_rows):
            return "full"
        if self.tail.ntotal >= max(p.merge_min, p.merge_ratio * self.alive_count):
            return "merge"
        if idle and self.tail.ntotal >= p.idle_merge_min:
            return "merge"
        return None

    # --- reads ---

    def search(
        self, query: Matrix, k: int, allowed: Labels | None = None, exact: bool = False, rescored: bool = False
    ) -> tuple[Scores, Labels]:
        """Top-k (scores, labels) of one query row over tail and base, optionally restricted to `allowed`.

        exact: score the base's allowed rows exhaustively (cursor paging: an approximate search of a later page
        could miss hits an earlier page ranked below, leaving gaps). rescored: the caller re-scores every hit
        exactly (PQ re-ranking), so the base's approximate hits keep the index's own scores."""
        parts: list[tuple[Scores, Labels]] = []
        tail_allowed = allowed
        if allowed is not None and self.tail.ntotal:
            tail_allowed = np.intersect1d(self.tail.labels(), allowed, assume_unique=False)
        if self.tail.ntotal and (tail_allowed is None or tail_allowed.shape[0]):
            s, lab = self.tail.search(query, min(k, self.tail.ntotal), tail_allowed)
            parts.append((s[0], lab[0]))
        if self.base is not None and self.alive_count:
            parts.append(self._search_base(query, k, allowed, exact, rescored))
        if not parts:
            return np.zeros(0, np.float32), np.zeros(0, np.int64)
        scores = np.concatenate([p[0] for p in parts])
        labels = np.concatenate([p[1] for p in parts])
        keep = labels >= 0
        scores, labels = scores[keep], labels[keep]
        order = np.lexsort((labels, -scores))[:k]
        return scores[order], labels[order]

    def _search_base(
        self, query: Matrix, k: int, allowed: Labels | None, exact: bool, rescored: bool = False
    ) -> tuple[Scores, Labels]:
        base = self.base
        assert base is not None
        rows: npt.NDArray[np.int64] | None = None
        if allowed is None:
            mask = None if self.alive_count == base.rows else self.alive
        else:
            rows = self.base_rows(allowed)
            if rows.shape[0] == 0:
                return np.zeros(0, np.float32), np.zeros(0, np.int64)
            if rows.shape[0] <= self.params.brute_limit:
                return self._brute(query, k, rows)
            mask = np.zeros(base.rows, dtype=bool)
            mask[rows] = True
        allowed_rows = self.alive_count if rows is None else int(rows.shape[0])
        if exact or 2 * k >= allowed_rows:
            # Asked for most of what is allowed (deep paging): exact is as cheap, and complete.
            return self._brute(query, k, rows if rows is not None else np.flatnonzero(self.alive).astype(np.int64))
        want = min(k, allowed_rows)
        scores, found = self._ann(query, k, mask)
        if rows is not None and int((found >= 0).sum()) < want:
            return self._brute(query, k, rows)
        rows_found = found[found >= 0].astype(np.int64)
        if rescored:
            # The caller's exact scores replace these: decoding the hits here (as below) would be wasted.
            return scores[found >= 0], base.row_labels[rows_found]
        # Re-scored the way _brute scores, so that a hit has one score whichever path found it (cursor paging
        # compares scores across pages).
        return (
            self._brute(query, int(rows_found.shape[0]), rows_found) if rows_found.shape[0] else (scores[:0], found[:0])
        )

    def _ann(
        self, query: Matrix, k: int, mask: npt.NDArray[np.bool_] | None, nprobe: int | None = None
    ) -> tuple[Scores, Labels]:
        """The base's own search, restricted to the rows set in `mask` (None: all); IVF probes `nprobe` lists
        (None: the configured ivf_nprobe)."""
        base = self.base
        assert base is not None
        bitmap = _bitmap(mask) if mask is not None else None
        sel = faiss.IDSelectorBitmap(base.rows, faiss.swig_ptr(bitmap)) if bitmap is not None else None
        if base.kind == "HNSW":
            params: Any = faiss.SearchParametersHNSW()  # type: ignore[attr-defined]
            params.efSearch = max(self.params.hnsw_ef_search, k)
        else:
            params = faiss.SearchParametersIVF()
            params.nprobe = self.params.ivf_nprobe if nprobe is None else nprobe
        if sel is not None:
            params.sel = sel
        if self.search_threads > 0:
            faiss.omp_set_num_threads(self.search_threads)
        scores, found = base.index.search(query, min(k, base.rows), params=params)
        del sel, bitmap
        return scores[0], found[0]

    def _brute(self, query: Matrix, k: int, rows: npt.NDArray[np.int64]) -> tuple[Scores, Labels]:
        """Exact scores of these rows against the base's stored (float16 or PQ-decoded) vectors."""
        base = self.base
        assert base is not None
        if base.kind == "IVFPQFS":
            return self._scan(query, k, rows)
        vecs = base.index.reconstruct_batch(np.ascontiguousarray(rows, dtype=np.int64))
        scores = (vecs @ query[0]).astype(np.float32)
        labels = base.row_labels[rows]
        top = min(k, scores.shape[0])
        pick = np.argpartition(-scores, top - 1)[:top] if top < scores.shape[0] else np.arange(scores.shape[0])
        return scores[pick], labels[pick]

    def _scan(self, query: Matrix, k: int, rows: npt.NDArray[np.int64]) -> tuple[Scores, Labels]:
        """_brute for fast-scan codes: an IVF search of every list restricted to these rows, so every one of them is
        scored (from its PQ code, as _brute scores an IVF-PQ row; the caller re-ranks exactly).

        Not reconstruct: in faiss 1.15.1 decoding a fast-scan base read back from a snapshot crashes the process.
        A scan of every code costs about what decoding brute_limit rows does (docs/benchmarks.md)."""
        base = self.base
        assert base is not None
        mask = np.zeros(base.rows, dtype=bool)
        mask[rows] = True
        scores, found = self._ann(query, k, mask, nprobe=faiss.extract_index_ivf(base.index).nlist)
        keep = found >= 0
        return scores[keep], base.row_labels[found[keep]]


def export_tail(space: SegmentedSpace) -> tuple[Labels, Matrix]:
    """Every (label, vector) of the tail, as float32 (the float16 vectors the shard stores)."""
    return contents(space.tail.cpu)


VectorSource = Callable[[Labels], Matrix]
