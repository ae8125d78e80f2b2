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


# Only exact search for now. An approximate kind is one more entry here (e.g. IndexKind("HNSW32", ...)) plus
# its training policy; everything else (snapshots, ground-truth tests against "Flat") stays as it is.
INDEX_KINDS: dict[str, IndexKind] = {
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
        self.cpu: Any = cpu_index if cpu_index is not None else new_cpu_index(kind, dim)
        if int(self.cpu.d) != dim:
            raise ValueError(f"index has dimension {self.cpu.d}, expected {dim}")
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
        if self.use_gpu and self._gpu is None:
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
        return faiss.vector_to_array(self.cpu.id_map).astype(np.int64, copy=False)

    def copy_cpu(self) -> Any:
        """A deep copy of the CPU master, for writing a snapshot without holding the shard's lock."""
        return faiss.clone_index(self.cpu)
