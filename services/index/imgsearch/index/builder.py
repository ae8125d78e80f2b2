"""The background builder: makes approximate bases (ann.py) off the lock and swaps them in under it.

Per space, when SegmentedSpace.build_due() says so: under the shared lock, copy the tail's (label, vector) pairs
and mark the space as building (from then on every label it removes is recorded). Off the lock, build the new base
(merge: clone of the old one plus the tail; full: from the old base's live vectors plus the tail). Under the
exclusive lock, install it, kill its rows of labels touched meanwhile, and drop the moved labels from the tail.
The old base serves until that moment. Nothing here is durable: SQLite is, and the next snapshot writes the base.
While a bulk load streams in (IndexSettings.ann_bulk_write_rate), the thread's passes leave bases to wait for it.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable

import faiss
import numpy as np

from imgsearch.index import metrics
from imgsearch.index.ann import Base, SegmentedSpace, build_base, export_tail
from imgsearch.index.indexes import Labels, Matrix
from imgsearch.index.state import Memory
from imgsearch.index.store import Store
from imgsearch.kit.locks import RWLock

log = logging.getLogger(__name__)


class Builder:
    def __init__(
        self,
        memory: Memory,
        store: Store,
        lock: RWLock,
        shard: str,
        nice: int = 0,
        on_swap: Callable[[], None] | None = None,
    ) -> None:
        self._memory = memory
        # Called under the exclusive lock once a new base is in (the shard's gauges: fewer vectors wait now).
        self._on_swap = on_swap
        self._nice = nice
        # The builder thread's kernel thread id, once it runs (its CPU priority is per thread on Linux).
        self.native_id: int | None = None
        self._store = store
        self._lock = lock
        self._shard = shard
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"builder-{shard}", daemon=True)
        # One build at a time (the thread, or a caller of run_once).
        self._mutex = threading.Lock()

    def start(self) -> None:
        self._thread.start()

    def poke(self) -> None:
        self._wake.set()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join()

    def _loop(self) -> None:
        self.native_id = threading.get_native_id()
        lower_priority(self._nice, self._shard)
        while not self._stop.is_set():
            try:
                self.run_once(background=True)
            except Exception:
                log.exception("index build failed; will retry", extra={"shard": self._shard})
                self._stop.wait(5.0)
            self._wake.wait(timeout=1.0)
            self._wake.clear()

    def run_once(self, background: bool = False) -> int:
        """Build every base that is due now (on the calling thread); returns how many were built.

        background: the builder thread's own pass, which leaves bases to wait while a bulk load streams in; an
        explicit call (ShardIndex.build_indexes) builds what is due regardless."""
        with self._mutex:
            return self._run(background)

    def _run(self, background: bool = False) -> int:
        done = 0
        while not self._stop.is_set():
            with self._lock.read():
                memory = self._memory
                idle = self._idle()
                bulk = background and self._bulk()
                spaces: list[tuple[str | None, SegmentedSpace]] = [(None, memory.visual)]
                spaces += list(memory.semantic.items())
                due = [
                    (head, space, mode) for head, space in spaces if (mode := space.build_due(idle, bulk)) is not None
                ]
            if not due:
                return done
            head, space, mode = due[0]
            if self._build(head, space, mode):
                done += 1
        return done

    def _source(self, head: str | None) -> Callable[[Labels], tuple[Labels, Matrix]]:
        def read(labels: Labels) -> tuple[Labels, Matrix]:
            got: list[int] = []
            blobs: list[bytes] = []
            for chunk in self._store.vectors([int(x) for x in labels]):
                if head is None:
                    got += chunk.visual_labels
                    blobs += chunk.visual
                elif head in chunk.semantic:
                    got += chunk.semantic[head][0]
                    blobs += chunk.semantic[head][1]
            dim = self._memory.settings.visual_dim if head is None else self._memory.settings.semantic_dim
            vecs = np.frombuffer(b"".join(blobs), dtype="<f2").reshape(len(blobs), dim).astype(np.float32)
            return np.asarray(got, dtype=np.int64), vecs

        return read

    def _bulk(self) -> bool:
        """Whether a bulk load is streaming in (writes at ann_bulk_write_rate or more): builds wait for it."""
        rate = self._memory.settings.ann_bulk_write_rate
        return rate > 0 and self._memory.write_rate() >= rate

    def _idle(self) -> bool:
        """Whether writes stopped long enough to fold small exact tails into their bases."""
        wait = self._memory.settings.ann_idle_merge_seconds
        return wait > 0 and time.monotonic() - self._memory.last_write_s >= wait

    def _build(self, head: str | None, space: SegmentedSpace, mode: str) -> bool:
        with self._lock.read():
            if space.build_due(self._idle()) is None:
                return False
            tail_labels, tail_vecs = export_tail(space)
            old = space.base
            old_alive = space.alive.copy()
            space.building = set()
        t0 = time.perf_counter()
        try:
            threads = self._memory.settings.build_threads
            if threads > 0:
                faiss.omp_set_num_threads(threads)
            new = self._make(head, space, mode, old, old_alive, tail_labels, tail_vecs)
        except BaseException:
            with self._lock.write():
                space.building = None
            raise
        with self._lock.write():
            touched = space.building or set()
            space.building = None
            if mode == "merge" and old is not None:
                alive = np.concatenate([space.alive, np.ones(tail_labels.shape[0], dtype=bool)])
            else:
                alive = np.ones(new.rows, dtype=bool)
            space.install(new, alive)
            if touched:
                rows = space.base_rows(np.fromiter(touched, dtype=np.int64, count=len(touched)))
                space.alive[rows] = False
                space.alive_count -= int(rows.shape[0])
            moved = tail_labels[~np.isin(tail_labels, np.fromiter(touched, dtype=np.int64, count=len(touched)))]
            space.tail.remove(moved)
            space.tail.sync()
            # No write changed, but the bases did: without a snapshot a restart would load the old snapshot and
            # build this base again from its tail (9 minutes for a 500k HNSW), searching exactly meanwhile.
            self._memory.snapshot_needed = True
            if self._on_swap is not None:
                self._on_swap()
        seconds = time.perf_counter() - t0
        metrics.BUILD_SECONDS.labels(self._shard, "visual" if head is None else "semantic", mode).observe(seconds)
        log.info(
            "approximate index swapped in",
            extra={
                "shard": self._shard,
                "space": "visual" if head is None else f"semantic:{head}",
                "kind": new.kind,
                "mode": mode,
                "rows": new.rows,
                "from_tail": int(tail_labels.shape[0]),
                "seconds": round(seconds, 3),
            },
        )
        return True

    def _make(
        self,
        head: str | None,
        space: SegmentedSpace,
        mode: str,
        old: Base | None,
        old_alive: np.ndarray,
        tail_labels: Labels,
        tail_vecs: Matrix,
    ) -> Base:
        if mode == "merge" and old is not None:
            return build_base(space.kind, space.dim, tail_vecs, tail_labels, space.params, old)
        labels, vecs = tail_labels, tail_vecs
        if old is not None and old_alive.any():
            rows = np.flatnonzero(old_alive).astype(np.int64)
            if old.kind == "HNSW":
                # The float16 storage is lossless for what the shard stores.
                base_labels, base_vecs = old.row_labels[rows], old.index.reconstruct_batch(rows)
            else:
                base_labels, base_vecs = self._source(head)(old.row_labels[rows])
            labels = np.concatenate([base_labels, tail_labels])
            vecs = np.concatenate([np.asarray(base_vecs, dtype=np.float32), tail_vecs])
        return build_base(space.kind, space.dim, vecs, labels, space.params, None)


def lower_priority(increment: int, shard: str) -> None:
    """Make the calling thread `increment` nicer than it is (Linux priorities are per thread).

    A build is hundreds of CPU seconds (a 500k HNSW: ~9 minutes) that nothing waits for, while the same process
    answers searches and acknowledges writes: at a lower priority it takes the CPU they leave idle instead of
    sharing it with them (docs/benchmarks.md). Relative, so a shard that already runs niced stays below it.
    """
    if increment <= 0 or not hasattr(os, "setpriority"):
        return
    tid = threading.get_native_id()
    try:
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + increment))
    except OSError as exc:
        log.warning("could not lower the builder's priority", extra={"shard": shard, "error": str(exc)})
