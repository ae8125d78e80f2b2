"""When and how a shard writes FAISS snapshots: after snapshot_every changes or an interval, on a background thread."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from imgsearch.index import snapshot
from imgsearch.index.ann import SegmentedSpace
from imgsearch.index.state import Memory
from imgsearch.index.store import Store
from imgsearch.kit.locks import RWLock

log = logging.getLogger(__name__)


def _saved(space: SegmentedSpace) -> Any:
    """What a snapshot writes of a space (under the shared lock): a copy of its tail, plus its immutable base and
    a copy of the base's liveness."""
    tail = space.copy_tail()
    if space.base is None:
        return tail
    return (tail, space.base, space.alive.copy())


class Snapshots:
    """Writes snapshots of `memory` and prunes the change log they cover.

    A snapshot copies the CPU indexes under the shared lock (searches go on; writers wait for a memory copy, not
    for the disk) and writes the copy with no lock held.
    """

    def __init__(
        self,
        memory: Memory,
        store: Store,
        directory: Path,
        lock: RWLock,
        write_mutex: threading.Lock,
        shard: str,
        on_change: Callable[[], None],
    ) -> None:
        self._memory = memory
        self._store = store
        self._directory = directory
        self._lock = lock
        self._write_mutex = write_mutex
        self._shard = shard
        # Called under the exclusive lock once the snapshot state changed (to publish metrics).
        self._on_change = on_change
        self._mutex = threading.Lock()
        self._opened = time.time()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"snapshot-{shard}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def age_seconds(self) -> float:
        since = self._memory.snapshot_ms / 1000 if self._memory.snapshot_ms else self._opened
        return max(0.0, time.time() - since)

    def poke(self) -> None:
        """A write happened: wake the thread if enough changes piled up."""
        if self._memory.wal >= self.threshold():
            self._wake.set()

    def threshold(self) -> int:
        """Changes that make a snapshot due: snapshot_every, and at least snapshot_growth of the records, so
        that a bulk load writes O(log N) snapshots (O(N) bytes in all), not one every snapshot_every writes.

        And at least the largest exact tail: a snapshot rewrites every tail vector (float32; approximate bases
        are written once and linked after), so it never writes more vectors than the changes it spares a
        restart from replaying. Before the first base is built the tail is the whole shard, and snapshots at
        every quarter of growth wrote each vector ~4 times over a bulk load (a fifth of its CPU).
        """
        memory = self._memory
        settings = memory.settings
        tail = max(space.tail.ntotal for space in memory.all_spaces())
        return max(settings.snapshot_every, int(settings.snapshot_growth * len(memory.slots)), tail)

    def write(self, force: bool = False) -> bool:
        """Write a snapshot if anything changed since the last one (or if forced); True if one was written."""
        memory = self._memory
        settings = memory.settings
        with self._mutex:
            with self._lock.read():
                seq = memory.applied_seq
                if not force and not memory.snapshot_needed and seq == memory.snapshot_seq:
                    return False
                visual = _saved(memory.visual)
                semantic = {h: _saved(s) for h, s in memory.semantic.items()}
            t0 = time.perf_counter()
            snap = snapshot.write(
                self._directory,
                seq=seq,
                shard_uuid=self._store.shard_uuid,
                index_type=memory.kind.name,
                visual_dim=settings.visual_dim,
                semantic_dim=settings.semantic_dim,
                visual=visual,
                semantic=semantic,
                visual_kind=settings.visual_index,
                semantic_kind=settings.semantic_index,
            )
            with self._write_mutex:
                remaining = self._store.prune_changes(seq)
                with self._lock.write():
                    memory.snapshot_seq, memory.snapshot_ms, memory.wal = seq, snap.created_ms, remaining
                    memory.snapshot_needed = False
                    self._on_change()
            log.info(
                "snapshot written",
                extra={"shard": self._shard, "seq": seq, "seconds": round(time.perf_counter() - t0, 3)},
            )
            return True

    def _due(self) -> bool:
        memory = self._memory
        if memory.snapshot_needed or memory.wal >= self.threshold():
            return True
        return memory.wal > 0 and self.age_seconds() >= memory.settings.snapshot_interval_seconds

    def _loop(self) -> None:
        interval = self._memory.settings.snapshot_interval_seconds
        while not self._stop.is_set():
            if self._due():
                try:
                    self.write()
                except Exception:
                    log.exception("snapshot failed; will retry", extra={"shard": self._shard})
                    # Back off, or a persistent failure (disk full) would spin.
                    self._stop.wait(min(interval, 30.0))
                    continue
            wait = interval - self.age_seconds() if self._memory.wal > 0 else interval
            self._wake.wait(timeout=max(0.05, wait))
            self._wake.clear()

    def stop(self) -> None:
        """Stop the background thread (waits for a snapshot in progress)."""
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join()
