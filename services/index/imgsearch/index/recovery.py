"""Start-up: load the newest valid snapshot and replay the change log after it, or rebuild from SQLite."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np

from imgsearch.index import snapshot
from imgsearch.index.state import Memory
from imgsearch.index.store import Store, VectorChunk
from imgsearch.index.types import LoadReport
from imgsearch.index.validation import join_heads

log = logging.getLogger(__name__)


def load(memory: Memory, store: Store, directory: Path, shard: str) -> LoadReport:
    """Fill `memory` with what SQLite holds; a missing or unusable snapshot means a full rebuild."""
    t0 = time.perf_counter()
    settings = memory.settings
    snapshot.remove_debris(directory)
    memory.set_slots(store.slots())
    last_seq = store.last_seq()
    memory.applied_seq = last_seq
    newest = snapshot.newest(directory)
    reason = "no snapshot"
    if newest is not None:
        expected = snapshot.Expected(
            shard_uuid=store.shard_uuid,
            visual_dim=settings.visual_dim,
            semantic_dim=settings.semantic_dim,
            max_seq=last_seq,
            min_seq=store.pruned_seq(),
            visual_kind=settings.visual_index,
            semantic_kind=settings.semantic_index,
        )
        try:
            snap = snapshot.load(newest, expected)
            touched, n_changes = store.changes_after(snap.seq)
            memory.reset_indexes(snap.visual, snap.semantic)
            replay(memory, store, touched)
            problem = verify(memory)
            if problem is not None:
                raise snapshot.SnapshotError(f"{newest.name}: after replay, {problem}")
            memory.snapshot_seq, memory.snapshot_ms, memory.wal = snap.seq, snap.created_ms, n_changes
            memory.snapshot_needed = n_changes >= max(
                settings.snapshot_every, settings.snapshot_growth * len(memory.slots)
            )
            return LoadReport("snapshot", time.perf_counter() - t0, len(memory.slots), n_changes)
        except snapshot.SnapshotError as exc:
            reason = str(exc)
            log.warning("snapshot unusable, rebuilding from SQLite", extra={"shard": shard, "why": reason})
    memory.reset_indexes()
    for chunk in store.vectors():
        memory.add_chunk(chunk)
    memory.finish()
    _, memory.wal = store.changes_after(0)
    # Whatever a snapshot would save next start, write it now (in the background) rather than rebuild again.
    memory.snapshot_needed = bool(memory.slots) or newest is not None
    mode = "rebuild" if memory.slots else "empty"
    return LoadReport(mode, time.perf_counter() - t0, len(memory.slots), 0, reason)


def replay(memory: Memory, store: Store, touched: list[int]) -> None:
    """Bring snapshot indexes up to date: drop every label changed since, re-add its current vectors."""
    if not touched:
        return
    memory.remove_labels(touched)
    # One add per index: the first add after loading a snapshot reallocates the whole index (a loaded index has
    # no spare capacity), so adding chunk by chunk would copy it once per chunk.
    merged = VectorChunk()
    for chunk in store.vectors(touched):
        merged.merge(chunk)
    memory.add_chunk(merged)
    memory.finish()


def verify(memory: Memory) -> str | None:
    """Check that the FAISS indexes hold exactly the labels SQLite says they should."""
    want_visual = sorted(label for label, s in memory.slots.items() if s.has_visual)
    want_heads: dict[str, list[int]] = {}
    for label, s in memory.slots.items():
        for head in s.heads:
            want_heads.setdefault(head, []).append(label)
    if not np.array_equal(np.sort(memory.visual.labels()), np.asarray(want_visual, dtype=np.int64)):
        return f"the visual index holds {memory.visual.ntotal} vectors, SQLite {len(want_visual)}"
    if set(memory.semantic) != set(want_heads):
        return f"semantic heads {join_heads(list(memory.semantic))} in FAISS, {join_heads(list(want_heads))} in SQLite"
    for head, labels in want_heads.items():
        if not np.array_equal(np.sort(memory.semantic[head].labels()), np.sort(np.asarray(labels, np.int64))):
            return f"the index of head {head!r} does not hold the labels SQLite has for it"
    return None
