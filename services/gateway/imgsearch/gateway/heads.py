"""Which head the cluster uses (stored durably in the index shards) and the build-then-flip switch."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from imgsearch.gateway import metrics
from imgsearch.heads import Head, HeadCatalog, head_id
from imgsearch.kit.convert import Matrix
from imgsearch.kit.errors import FailedPrecondition, ImgsearchError, Unavailable

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class HeadConfig:
    """The cluster's head configuration: queries use `active`; `building` is being filled in beside it.

    Every shard stores a copy and only ever accepts a higher epoch, so the copy with the highest epoch is
    the configuration in force; a gateway that sees an older one on some shard pushes the newest to it.
    """

    epoch: int = 0
    active: str = ""
    building: str = ""

    @property
    def write_heads(self) -> tuple[str, ...]:
        """Heads every newly stored image needs a vector of (dual-write while a switch is built)."""
        return (self.active, self.building) if self.building else (self.active,)

    def key(self) -> tuple[int, str, str]:
        # Two gateways may propose the same epoch with different heads: the larger tuple wins everywhere.
        return (self.epoch, self.active, self.building)


@dataclass(frozen=True)
class ShardHeads:
    """One shard's answer: its stored configuration and how many of its images each head covers."""

    shard: str
    config: HeadConfig
    records: int = 0
    vectors: dict[str, int] = field(default_factory=dict)
    last_write_ms: int = 0
    reachable: bool = True

    def complete(self, head: str) -> bool:
        return self.vectors.get(head, 0) >= self.records


@dataclass(frozen=True)
class StoredSignals:
    """What a shard keeps of an image that is enough to re-project it: normalised features, norm, top logits."""

    id: str
    visual: Matrix
    feature_norm: float
    top_logits: list[tuple[int, float]]


class HeadShard(Protocol):
    """What head management needs from an index shard (the gRPC client, or an in-memory fake in tests)."""

    name: str

    async def head_state(self, timeout: float) -> ShardHeads: ...

    async def set_head_config(self, config: HeadConfig, timeout: float) -> ShardHeads: ...

    async def scan_missing(
        self, head: str, page_size: int, page_token: str, timeout: float
    ) -> tuple[list[StoredSignals], str]: ...

    async def set_semantic(self, head: str, updates: Sequence[tuple[str, Matrix]], timeout: float) -> int: ...


def dense_logits(pairs: Sequence[tuple[int, float]], classes: int) -> Matrix:
    """Logits rebuilt from stored top pairs; the missing classes get a probability of zero after softmax."""
    out = np.full(classes, -1e9, dtype=np.float32)
    for i, v in pairs:
        out[i] = v
    return out


def project_images(catalog: HeadCatalog, head: Head, features: Matrix, logits: Matrix | None) -> Matrix:
    """Image directions under one head, after checking the signals fit it."""
    catalog.check_signals(head, features, logits)
    return head.project_images(features, logits)


@dataclass(frozen=True)
class SwitchStatus:
    config: HeadConfig
    shards: list[ShardHeads]


@dataclass(frozen=True)
class Activation:
    head: Head
    previous: str
    failed_shards: list[str]
    status: SwitchStatus


class HeadManager:
    """Knows the head configuration in force, builds a new head's space, and flips when it is complete.

    The switch is a reconciliation, not a long call: ActivateHead only raises the epoch with `building`
    set; every gateway's loop then backfills shards that lack the building head's vectors (from what the
    shard keeps: normalised features, their norm, top logits) and, once every shard reports the space
    complete, proposes the flip. Queries keep using `active` throughout, and its space stays complete
    because new images are written under both heads, so no search fails or misses stored images during
    a switch. A gateway restart or a second gateway simply resumes: the state lives in the shards.
    """

    def __init__(
        self,
        catalog: HeadCatalog,
        shards: Sequence[HeadShard],
        *,
        default_head: str,
        timeout: float,
        page_size: int = 256,
        refresh_seconds: float = 1.0,
        stall_seconds: float = 15.0,
    ) -> None:
        self.catalog = catalog
        self.shards = list(shards)
        self.default_head = default_head
        self.timeout = timeout
        self.page_size = page_size
        self.refresh_seconds = refresh_seconds
        self.stall_seconds = stall_seconds
        self.config: HeadConfig | None = None
        self.states: dict[str, ShardHeads] = {}
        self._tasks: dict[tuple[str, str], asyncio.Task[None]] = {}
        # Heads this gateway was asked to build: it works on them even if another gateway seems busy.
        self._mine: set[str] = set()
        self._refresh_lock = asyncio.Lock()
        self._wake = asyncio.Event()

    # ---- the configuration in force -------------------------------------------------------------------

    async def refresh(self) -> HeadConfig | None:
        """Read every shard; adopt the highest configuration; push it to shards that are behind."""
        async with self._refresh_lock:
            answers = await asyncio.gather(*(s.head_state(self.timeout) for s in self.shards), return_exceptions=True)
            for shard, answer in zip(self.shards, answers, strict=True):
                if isinstance(answer, ShardHeads):
                    self.states[shard.name] = answer
                elif isinstance(answer, ImgsearchError):
                    old = self.states.get(shard.name)
                    self.states[shard.name] = (
                        ShardHeads(shard.name, HeadConfig(), reachable=False)
                        if old is None
                        else ShardHeads(
                            old.shard, old.config, old.records, old.vectors, old.last_write_ms, reachable=False
                        )
                    )
                else:
                    raise answer
            seen = [s.config for s in self.states.values() if s.reachable]
            if not seen:
                return self.config
            best = max(seen, key=HeadConfig.key)
            if best.epoch == 0:
                # A fresh cluster: the configured default head becomes active everywhere.
                best = await self._propose(HeadConfig(1, head_id(self.catalog.default(self.default_head)), ""))
            elif any(c.key() != best.key() for c in seen if c.epoch == best.epoch):
                # Equal epochs with different heads (two concurrent proposals): settle on one, one epoch up.
                best = await self._propose(HeadConfig(best.epoch + 1, best.active, best.building))
            else:
                behind = [
                    s for s in self.shards if self.states[s.name].reachable and self.states[s.name].config != best
                ]
                if behind:
                    await self._push(best, behind)
            if self.config != best:
                log.info(
                    "head configuration",
                    extra={"epoch": best.epoch, "active": best.active, "building": best.building},
                )
                metrics.HEAD_EPOCH.set(best.epoch)
                metrics.HEAD_BUILDING.set(1 if best.building else 0)
            self.config = best
            return best

    async def _push(self, config: HeadConfig, shards: Sequence[HeadShard]) -> list[str]:
        """Store a configuration on shards; returns the names of those that did not answer."""
        answers = await asyncio.gather(
            *(s.set_head_config(config, self.timeout) for s in shards), return_exceptions=True
        )
        failed = []
        for shard, answer in zip(shards, answers, strict=True):
            if isinstance(answer, ShardHeads):
                self.states[shard.name] = answer
            elif isinstance(answer, ImgsearchError):
                log.warning("shard did not take the head configuration", extra={"shard": shard.name})
                failed.append(shard.name)
            else:
                raise answer
        return failed

    async def _propose(self, config: HeadConfig) -> HeadConfig:
        await self._push(
            config, [s for s in self.shards if self.states.get(s.name, ShardHeads(s.name, config)).reachable]
        )
        stored = [s.config for s in self.states.values() if s.reachable]
        return max([config, *stored], key=HeadConfig.key)

    def current(self) -> HeadConfig:
        if self.config is None or not self.config.active:
            raise Unavailable("the head configuration is not known yet: no index shard has answered; retry shortly")
        return self.config

    def active(self) -> Head:
        """The head queries use; NotFound-free: a head another gateway activated must be installed here too."""
        hid = self.current().active
        try:
            return self.catalog.get(hid)
        except ImgsearchError:
            raise FailedPrecondition(
                f"head {hid} is active in the index but not installed in this gateway's heads directory"
            ) from None

    def write_heads(self) -> list[Head]:
        out = []
        for hid in self.current().write_heads:
            try:
                out.append(self.catalog.get(hid))
            except ImgsearchError:
                raise FailedPrecondition(
                    f"head {hid} is configured in the index but not installed in this gateway's heads directory"
                ) from None
        return out

    def status(self) -> SwitchStatus:
        return SwitchStatus(self.current(), [self.states[s.name] for s in self.shards if s.name in self.states])

    # ---- switching ------------------------------------------------------------------------------------

    async def activate(self, spec: str) -> Activation:
        """Start building `spec` (or cancel a build when `spec` is the active head); returns at once."""
        head = self.catalog.resolve(spec)
        hid = head_id(head)
        config = await self.refresh() or self.current()
        previous = config.active
        if hid == config.active and not config.building:
            return Activation(head, previous, [], self.status())
        if hid == config.building:
            self._wake.set()
            return Activation(head, previous, [], self.status())
        target = HeadConfig(config.epoch + 1, config.active, "" if hid == config.active else hid)
        self._mine.add(hid)
        failed = await self._push(target, self.shards)
        if len(failed) == len(self.shards):
            raise Unavailable("no index shard answered; the head switch was not started")
        await self.refresh()
        log.info("head switch started", extra={"head": hid, "previous": previous, "failed_shards": failed})
        self._wake.set()
        return Activation(head, previous, failed, self.status())

    async def run(self) -> None:
        """Refresh and reconcile until cancelled; woken early by activate()."""
        while True:
            try:
                await self.refresh()
                await self.reconcile()
            except ImgsearchError as exc:
                log.warning("head reconciliation failed", extra={"error": exc.message})
            # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancel that races the event.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.refresh_seconds):
                    await self._wake.wait()
            self._wake.clear()

    async def reconcile(self) -> None:
        """Backfill shards missing a needed head's vectors; flip once the building head is complete."""
        config = self.config
        if config is None or not config.active:
            return
        now_ms = int(time.time() * 1000)
        for hid in config.write_heads:
            if hid not in self.catalog.heads:
                continue
            for shard in self.shards:
                state = self.states.get(shard.name)
                if state is None or not state.reachable or state.complete(hid):
                    continue
                key = (shard.name, hid)
                task = self._tasks.get(key)
                if task is not None and not task.done():
                    continue
                # Another gateway wrote this shard's vectors moments ago: it is on it; resume if it stalls.
                if hid not in self._mine and task is None and now_ms - state.last_write_ms < self.stall_seconds * 1000:
                    continue
                self._tasks[key] = asyncio.create_task(self._backfill(shard, hid))
        if config.building:
            states = [self.states.get(s.name) for s in self.shards]
            if all(
                st is not None and st.reachable and st.config == config and st.complete(config.building)
                for st in states
            ):
                flipped = await self._propose(HeadConfig(config.epoch + 1, config.building, ""))
                log.info("head switch complete: flipped", extra={"active": flipped.active, "epoch": flipped.epoch})
                self.config = flipped
                metrics.HEAD_EPOCH.set(flipped.epoch)
                metrics.HEAD_BUILDING.set(1 if flipped.building else 0)

    async def _backfill(self, shard: HeadShard, hid: str) -> None:
        """Give every image on one shard a vector of `hid`, projected from what the shard keeps."""
        head = self.catalog.get(hid)
        classes = len(self.catalog.info.class_labels)
        token = ""
        done = 0
        try:
            while True:
                records, token = await shard.scan_missing(hid, self.page_size, token, self.timeout)
                if records:
                    features = np.stack([r.visual * (r.feature_norm or 1.0) for r in records]).astype(np.float32)
                    logits = None
                    if head.needs_logits:
                        logits = np.stack([dense_logits(r.top_logits, classes) for r in records])
                    vectors = await asyncio.to_thread(project_images, self.catalog, head, features, logits)
                    done += await shard.set_semantic(
                        hid, [(r.id, vectors[i]) for i, r in enumerate(records)], self.timeout
                    )
                    metrics.BACKFILLED.labels(shard.name).inc(len(records))
                if not token:
                    break
        except ImgsearchError as exc:
            # No wake-up here: the next attempt comes at the refresh pace, not in a tight loop.
            log.warning("backfill interrupted", extra={"shard": shard.name, "head": hid, "error": exc.message})
            return
        log.info("backfill done", extra={"shard": shard.name, "head": hid, "images": done})
        self._wake.set()

    async def close(self) -> None:
        for task in self._tasks.values():
            task.cancel()
        for task in self._tasks.values():
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
