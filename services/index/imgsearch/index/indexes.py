"""FAISS index construction behind a small factory, and one searchable vector space (CPU master, GPU replica)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import faiss
import numpy as np
import numpy.typing as npt

log = logging.getLogger(__name__)

Labels = npt.NDArray[np.int64]
Matrix = npt.NDArray[np.float32]


@dataclass(frozen=True)
class IndexKind:
    """A kind of FAISS index the shard can hold.

    `factory` is a faiss.index_factory string. The shard removes and replaces vectors by label, so a kind must
    support remove_ids; kinds that need training (IVF) must say so, so the shard trains before the first add.
    """

    name: str
    factory: str
    exact: bool
    needs_training: bool = False
    # The FAISS class inside the IDMap2: how an index read from a snapshot is recognised as this kind.
    inner: type = faiss.IndexFlat
    # Whether faiss-gpu can hold a replica of it (flat scalar-quantised indexes have no GPU version).
    gpu: bool = True


# The exact kinds, for small spaces and the exact tails of approximate ones (ann.py holds the approximate bases).
# SQfp16 stores float16 codes and scores them against the float32 query: exact for what the shard keeps, since
# the shard stores every vector as float16 (SQLite) and a restart rebuilds its tails from those. Against Flat's
# float32 copies it halves a tail's memory (a bulk load keeps hundreds of thousands of vectors there until the
# builder catches up) and, memory-bound, scans it 1.7-2.1x faster (docs/benchmarks.md). Flat stays the ground
# truth in tests and the choice for GPU replicas.
INDEX_KINDS: dict[str, IndexKind] = {
    "SQfp16": IndexKind(
        name="SQfp16", factory="IDMap2,SQfp16", exact=True, inner=faiss.IndexScalarQuantizer, gpu=False
    ),
    "Flat": IndexKind(name="Flat", factory="IDMap2,Flat", exact=True),
}


def gpu_count() -> int:
    """GPUs faiss can use; 0 for faiss-cpu builds, which may lack the GPU symbols entirely."""
    get_num_gpus: Callable[[], int] | None = getattr(faiss, "get_num_gpus", None)
    if get_num_gpus is None or not hasattr(faiss, "index_cpu_to_all_gpus"):
        return 0
    try:
        return int(get_num_gpus())
    except Exception:
        log.warning("faiss.get_num_gpus failed; searching on CPU", exc_info=True)
        return 0


def new_cpu_index(kind: IndexKind, dim: int) -> Any:
    """An empty CPU index of this kind (inner product, int64 labels)."""
    if kind.needs_training:
        raise ValueError(f"index kind {kind.name} needs training, which this shard does not implement")
    return faiss.index_factory(dim, kind.factory, faiss.METRIC_INNER_PRODUCT)


def labels_of(index: Any) -> Labels:
    """Every label of an IDMap2, in its inner index's storage order."""
    return faiss.vector_to_array(index.id_map).astype(np.int64, copy=False)


def contents(index: Any) -> tuple[Labels, Matrix]:
    """Every (label, vector) of an IDMap2 over an exact index, in storage order, the vectors as float32."""
    inner = faiss.downcast_index(index.index)
    vecs = inner.reconstruct_n(0, inner.ntotal) if inner.ntotal else np.zeros((0, index.d), np.float32)
    return labels_of(index), np.asarray(vecs, dtype=np.float32)


def as_kind(index: Any, kind: IndexKind, dim: int) -> Any:
    """`index` (an IDMap2 over an exact index, e.g. read from a snapshot written under another exact kind) as an
    index of `kind` holding the same labels and vectors; the index itself when it already is one."""
    if isinstance(faiss.downcast_index(index.index), kind.inner):
        return index
    out = new_cpu_index(kind, dim)
    labels, vecs = contents(index)
    out.add_with_ids(vecs, labels)
    return out


class VectorSpace:
    """One FAISS index over normalised vectors, addressed by int64 labels.

    The CPU index is the master copy: it supports remove_ids and is what snapshots write. With a GPU, searches
    run on a replica made by index_cpu_to_all_gpus; adds go to both, and a removal drops the replica, which the
    next `sync()` (end of the write, under the shard's exclusive lock) rebuilds: flat GPU indexes cannot remove
    vectors in place. GPU indexes are not safe for concurrent searches, so those are serialised.
    """

    def __init__(
        self, kind: IndexKind, dim: int, use_gpu: bool, cpu_index: Any | None = None, search_threads: int = 1
    ) -> None:
        self.kind = kind
        self.dim = dim
        self.use_gpu = use_gpu
        self.search_threads = search_threads
        if cpu_index is not None and int(cpu_index.d) != dim:
            raise ValueError(f"index has dimension {cpu_index.d}, expected {dim}")
        self.cpu: Any = as_kind(cpu_index, kind, dim) if cpu_index is not None else new_cpu_index(kind, dim)
        self._gpu: Any | None = None
        self._gpu_lock = threading.Lock()
        self.sync()

    @property
    def ntotal(self) -> int:
        return int(self.cpu.ntotal)

    def add(self, labels: Labels, vectors: Matrix) -> None:
        if labels.shape[0] == 0:
            return
        x = np.ascontiguousarray(vectors, dtype=np.float32)
        ids = np.ascontiguousarray(labels, dtype=np.int64)
        self.cpu.add_with_ids(x, ids)
        if self._gpu is not None:
            self._gpu.add_with_ids(x, ids)

    def remove(self, labels: Labels) -> int:
        """Remove these labels (absent ones are ignored); returns how many were removed."""
        if labels.shape[0] == 0:
            return 0
        removed = int(self.cpu.remove_ids(np.ascontiguousarray(labels, dtype=np.int64)))
        if removed:
            self._gpu = None
        return removed

    def sync(self) -> None:
        """Bring the GPU replica up to date with the CPU master (no-op on CPU)."""
        if self.use_gpu and self.kind.gpu and self._gpu is None:
            self._gpu = faiss.index_cpu_to_all_gpus(self.cpu)

    def search(self, query: Matrix, k: int, allowed: Labels | None = None) -> tuple[npt.NDArray[np.float32], Labels]:
        """Top-k (scores, labels) for each query row; missing results have label -1.

        `allowed`: only these labels may be returned (an IDSelector on the CPU master; GPU replicas take none).
        """
        if allowed is not None:
            ids = np.ascontiguousarray(allowed, dtype=np.int64)
            params = faiss.SearchParameters()
            params.sel = faiss.IDSelectorBatch(ids.shape[0], faiss.swig_ptr(ids))
            if self.search_threads > 0:
                faiss.omp_set_num_threads(self.search_threads)
            scores, labels = self.cpu.search(query, k, params=params)
            return scores, labels
        if self._gpu is not None:
            with self._gpu_lock:
                scores, labels = self._gpu.search(query, k)
        else:
            if self.search_threads > 0:
                # OpenMP's thread count is per calling thread, so it is set here, on the worker that searches.
                faiss.omp_set_num_threads(self.search_threads)
            scores, labels = self.cpu.search(query, k)
        return scores, labels

    def labels(self) -> Labels:
        """Every label held, in storage order."""
        return labels_of(self.cpu)

    def copy_cpu(self) -> Any:
        """A deep copy of the CPU master, for writing a snapshot without holding the shard's lock."""
        return faiss.clone_index(self.cpu)
