"""The shard's in-memory state: the id map and the FAISS indexes (visual, one per head), derived from SQLite."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from imgsearch.index.ann import SegmentedSpace
from imgsearch.index.indexes import IndexKind
from imgsearch.index.settings import IndexSettings
from imgsearch.index.store import Slot, VectorChunk
from imgsearch.index.types import Space, Vector
from imgsearch.kit.errors import FailedPrecondition


@dataclass
class Delta:
    """A committed batch's effect on the indexes and the id map (see writes.resolve)."""

    drop_visual: list[int] = field(default_factory=list)
    drop_heads: dict[str, list[int]] = field(default_factory=dict)
    add_visual: tuple[list[int], list[Vector]] = field(default_factory=lambda: ([], []))
    add_heads: dict[str, tuple[list[int], list[Vector]]] = field(default_factory=dict)
    # Labels whose slot changes, with their new slot (None: deleted).
    slots: dict[int, Slot | None] = field(default_factory=dict)
    last_seq: int = 0
    changes: int = 0


# The window of Memory.write_rate(): long enough that a loader's pauses between requests do not end a bulk load.
WRITE_RATE_WINDOW_S = 10.0


class Memory:
    """Id map and FAISS indexes, plus where they stand against the change log. Callers hold the shard's locks."""

    def __init__(self, settings: IndexSettings, kind: IndexKind, use_gpu: bool, db_path: Path) -> None:
        self.settings = settings
        self.kind = kind
        self.use_gpu = use_gpu
        self.db_path = db_path
        self.ids: dict[str, int] = {}
        self.slots: dict[int, Slot] = {}
        self._heads: dict[frozenset[str], frozenset[str]] = {}
        self.visual = self.space(Space.VISUAL)
        self.semantic: dict[str, SegmentedSpace] = {}
        # Last change seq applied to the indexes, the seq and time of the newest snapshot, changes since it.
        self.applied_seq = 0
        self.snapshot_seq = 0
        self.snapshot_ms = 0
        self.wal = 0
        self.snapshot_needed = False
        # time.monotonic() of the last write applied (start counts as one): the builder folds exact tails into
        # their bases once writes stopped (IndexSettings.ann_idle_merge_seconds).
        self.last_write_s = time.monotonic()
        # (time.monotonic(), changes) of the writes of the last WRITE_RATE_WINDOW_S: tells a bulk load from
        # everyday writes (IndexSettings.ann_bulk_write_rate).
        self._recent_writes: deque[tuple[float, int]] = deque()

    def space(self, which: Space, tail: Any | None = None) -> SegmentedSpace:
        s = self.settings
        kind, dim = (s.visual_index, s.visual_dim) if which is Space.VISUAL else (s.semantic_index, s.semantic_dim)
        return SegmentedSpace(kind, self.kind, dim, self.use_gpu, s.ann_params(), tail, s.search_threads)

    def set_slots(self, slots: dict[int, Slot]) -> None:
        for slot in slots.values():
            self._intern(slot)
        self.slots = slots
        self.ids = {slot.id: label for label, slot in slots.items()}

    def _intern(self, slot: Slot) -> None:
        """Share one frozenset per distinct set of heads: at a million records, a set each costs ~200 MB."""
        key = slot.heads if isinstance(slot.heads, frozenset) else frozenset(slot.heads)  # writes may pass a set
        heads = self._heads.setdefault(key, key)
        if heads is not slot.heads:
            # Slot is frozen for its users; swapping an equal (frozen) set in is invisible to them.
            object.__setattr__(slot, "heads", heads)

    def reset_indexes(self, visual: Any | None = None, semantic: dict[str, Any] | None = None) -> None:
        """Empty spaces, or these (snapshot) spaces: an exact tail index, or (tail index, base, alive rows)."""
        self.visual = self._restore(Space.VISUAL, visual)
        self.semantic = {h: self._restore(Space.SEMANTIC, i) for h, i in (semantic or {}).items()}

    def _restore(self, which: Space, saved: Any | None) -> SegmentedSpace:
        if isinstance(saved, tuple):
            tail, base, alive = saved
            space = self.space(which, tail)
            space.install(base, alive)
            return space
        return self.space(which, saved)

    def all_spaces(self) -> list[SegmentedSpace]:
        return [self.visual, *self.semantic.values()]

    def head_counts(self) -> dict[str, int]:
        """Vectors held per head, i.e. live records with a vector of it (heads without any are not listed)."""
        return {h: s.ntotal for h, s in sorted(self.semantic.items()) if s.ntotal > 0}

    def head_space(self, head: str) -> SegmentedSpace:
        space = self.semantic.get(head)
        if space is None:
            space = self.semantic[head] = self.space(Space.SEMANTIC)
        return space

    def add_chunk(self, chunk: VectorChunk) -> None:
        if chunk.visual_labels:
            self.visual.add(np.asarray(chunk.visual_labels, np.int64), self._matrix(chunk.visual, "visual"))
        for head, (labels, blobs) in chunk.semantic.items():
            self.head_space(head).add(np.asarray(labels, np.int64), self._matrix(blobs, "semantic"))

    def _matrix(self, blobs: list[bytes], space: str) -> Vector:
        dim = self.settings.visual_dim if space == "visual" else self.settings.semantic_dim
        if any(len(b) != dim * 2 for b in blobs):
            raise FailedPrecondition(f"{self.db_path} holds a {space} vector that is not {dim} float16 values")
        return np.frombuffer(b"".join(blobs), dtype="<f2").reshape(len(blobs), dim).astype(np.float32)

    def remove_labels(self, labels: Iterable[int]) -> None:
        arr = np.asarray(list(labels), dtype=np.int64)
        for space in self.all_spaces():
            space.remove(arr)

    def finish(self) -> None:
        """Drop emptied heads' indexes and bring GPU replicas up to date (end of every change)."""
        self.semantic = {h: s for h, s in self.semantic.items() if s.ntotal > 0}
        for space in self.all_spaces():
            space.sync()

    def apply(self, delta: Delta) -> None:
        """Apply a committed batch (under the shard's exclusive lock); removals first, then additions."""
        self.visual.remove(np.asarray(delta.drop_visual, np.int64))
        for head, labels in delta.drop_heads.items():
            if (space := self.semantic.get(head)) is not None:
                space.remove(np.asarray(labels, np.int64))
        if delta.add_visual[0]:
            self.visual.add(np.asarray(delta.add_visual[0], np.int64), np.stack(delta.add_visual[1]))
        for head, (labels, vecs) in delta.add_heads.items():
            self.head_space(head).add(np.asarray(labels, np.int64), np.stack(vecs))
        self.finish()
        # Two passes: a batch may delete an id and insert it again under a new label.
        for label in delta.slots:
            old = self.slots.pop(label, None)
            if old is not None and self.ids.get(old.id) == label:
                del self.ids[old.id]
        for label, slot in delta.slots.items():
            if slot is not None:
                self._intern(slot)
                self.slots[label] = slot
                self.ids[slot.id] = label
        self.applied_seq = delta.last_seq
        self.wal += delta.changes
        self.last_write_s = time.monotonic()
        self._recent_writes.append((self.last_write_s, delta.changes))
        self._forget_old_writes()

    def write_rate(self) -> float:
        """Changes per second over the last WRITE_RATE_WINDOW_S (callers hold the shard's lock, shared is enough)."""
        horizon = time.monotonic() - WRITE_RATE_WINDOW_S
        return sum(n for t, n in self._recent_writes if t >= horizon) / WRITE_RATE_WINDOW_S

    def _forget_old_writes(self) -> None:
        horizon = time.monotonic() - WRITE_RATE_WINDOW_S
        while self._recent_writes and self._recent_writes[0][0] < horizon:
            self._recent_writes.popleft()
