"""Tagger core: the active projection head and the live tag vocabulary, ranked by one matrix product."""

from __future__ import annotations

import asyncio
import base64
import logging
import re
import time
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path
from typing import Protocol

import numpy as np
import numpy.typing as npt

from imgsearch.heads import ConSEHead, Head, load_head
from imgsearch.kit.convert import Matrix
from imgsearch.kit.errors import (
    FailedPrecondition,
    ImgsearchError,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
)
from imgsearch.models.manifest import ModelInfo
from imgsearch.tagger import metrics
from imgsearch.tagger.settings import TaggerSettings
from imgsearch.tagger.store import StoredTag, VocabularyStore, now_ms, tag_key

log = logging.getLogger(__name__)

_SPACES = re.compile(r"\s+")


class TextSource(Protocol):
    """What the tagger needs from the encoder."""

    async def model_info(self, timeout: float) -> ModelInfo: ...

    async def encode_texts(self, texts: Sequence[str], timeout: float) -> list[Matrix | ImgsearchError]: ...


def head_id(head: Head) -> str:
    return f"{head.name}@{head.version}"


def clean_tag(raw: str, max_chars: int) -> str:
    """Canonical display form of a tag: NFC, trimmed, inner whitespace collapsed."""
    name = _SPACES.sub(" ", unicodedata.normalize("NFC", raw)).strip()
    if not name:
        raise InvalidArgument("tag is empty")
    if len(name) > max_chars:
        raise InvalidArgument(f"tag {name[:20]!r}... is {len(name)} characters long, the limit is {max_chars}")
    if any(unicodedata.category(ch) == "Cc" for ch in name):
        raise InvalidArgument(f"tag {name!r} contains control characters")
    return name


def starter_vocabulary(class_labels: Sequence[str]) -> list[str]:
    """ImageNet class names plus common everyday words, deduplicated case-insensitively."""
    text = resources.files("imgsearch.tagger").joinpath("everyday_words.txt").read_text(encoding="utf-8")
    words = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]
    seen: dict[str, str] = {}
    for name in [*class_labels, *words]:
        seen.setdefault(tag_key(name), name)
    return list(seen.values())


@dataclass(frozen=True)
class VocabState:
    """An immutable snapshot: requests hold one for their whole duration, writers swap in a new one."""

    head: Head
    keys: list[str]
    names: list[str]
    seen: npt.NDArray[np.bool_]
    added_ms: npt.NDArray[np.int64]
    raw: Matrix
    projected: Matrix
    bias: Matrix

    @property
    def head_id(self) -> str:
        return head_id(self.head)

    @property
    def size(self) -> int:
        return len(self.keys)


@dataclass(frozen=True)
class RankedTag:
    tag: str
    score: float
    seen: bool


@dataclass(frozen=True)
class TagChange:
    """Outcome of one tag in an add or remove."""

    tag: str
    changed: bool = False
    error: ImgsearchError | None = None


@dataclass(frozen=True)
class TagInfo:
    name: str
    seen: bool
    added_ms: int


def _build_state(head: Head, tags: Sequence[StoredTag], text_dim: int) -> VocabState:
    raw = (
        np.stack([t.embedding for t in tags]).astype(np.float32) if tags else np.zeros((0, text_dim), dtype=np.float32)
    )
    projected = head.project_texts(raw) if tags else raw
    return VocabState(
        head=head,
        keys=[t.key for t in tags],
        names=[t.name for t in tags],
        seen=np.array([t.seen for t in tags], dtype=bool),
        added_ms=np.array([t.added_ms for t in tags], dtype=np.int64),
        raw=raw,
        projected=projected,
        bias=head.tag_bias(projected),
    )


class Tagger:
    """Projection heads + live vocabulary. Reads are lock-free on a snapshot; writes are serialised."""

    def __init__(self, settings: TaggerSettings, source: TextSource) -> None:
        self.settings = settings
        self.source = source
        self.store = VocabularyStore(settings.data_dir / "vocabulary.sqlite3")
        self.heads: dict[str, Head] = {}
        self.info: ModelInfo | None = None
        self.conse: ConSEHead | None = None
        self._state: VocabState | None = None
        self._write = asyncio.Lock()
        # File stems as aliases, so DEFAULT_HEAD=default finds heads/default.npz.
        self._aliases: dict[str, str] = {}

    # ---- start-up -------------------------------------------------------------------------------

    async def start(self) -> None:
        """Wait for the encoder, embed class names and the starter vocabulary (cached), load heads."""
        info = await self._wait_for_encoder()
        self.info = info
        class_emb = await self._embed_cached(info.class_labels)
        self.conse = ConSEHead(
            class_embeddings=class_emb,
            top_t=self.settings.conse_top_t,
            anchor_penalty=self.settings.anchor_penalty,
            image_model=info.image_model_version,
        )
        self.heads = {head_id(self.conse): self.conse}
        self._load_head_dir()
        await self._seed_and_refresh(info)
        head = self._pick_default()
        self._state = await asyncio.to_thread(_build_state, head, self.store.load(), info.text_dim)
        self._publish_metrics()
        log.info(
            "tagger ready",
            extra={"head": self._state.head_id, "vocabulary": self._state.size, "heads": sorted(self.heads)},
        )

    async def _wait_for_encoder(self) -> ModelInfo:
        deadline = time.monotonic() + self.settings.startup_timeout_seconds
        delay = 0.2
        while True:
            try:
                return await self.source.model_info(timeout=self.settings.peer_timeout_seconds)
            except ImgsearchError as exc:
                if time.monotonic() > deadline:
                    raise
                log.info("waiting for the encoder", extra={"reason": exc.message})
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    async def _embed_cached(self, texts: Sequence[str]) -> Matrix:
        """Embeddings of texts that must all succeed, reusing those cached for this text model."""
        assert self.info is not None
        model = self.info.text_model_version
        cached = await asyncio.to_thread(self.store.cached_embeddings, model, texts)
        missing = [t for t in dict.fromkeys(texts) if t not in cached]
        for start in range(0, len(missing), 128):
            chunk = missing[start : start + 128]
            results = await self.source.encode_texts(chunk, timeout=self.settings.peer_timeout_seconds * 6)
            fresh: dict[str, Matrix] = {}
            for text, res in zip(chunk, results, strict=True):
                if isinstance(res, ImgsearchError):
                    raise FailedPrecondition(f"cannot embed {text!r}: {res.message}")
                fresh[text] = res
            await asyncio.to_thread(self.store.cache_embeddings, model, fresh)
            cached.update(fresh)
        return np.stack([cached[t] for t in texts]).astype(np.float32)

    async def _seed_and_refresh(self, info: ModelInfo) -> None:
        """First start: store the starter vocabulary. Later starts: re-embed tags of an old text model."""
        if self.store.get_meta("seeded") is None:
            names = starter_vocabulary(info.class_labels)
            emb = await self._embed_cached(names)
            ts = now_ms()
            self.store.put(
                [
                    StoredTag(tag_key(n), n, True, ts, info.text_model_version, e)
                    for n, e in zip(names, emb, strict=True)
                ]
            )
            # Seed once: a starter tag an operator removed must stay removed after a restart.
            self.store.set_meta("seeded", str(ts))
            log.info("seeded starter vocabulary", extra={"tags": len(names)})
        stale = [t for t in self.store.load() if t.text_model != info.text_model_version]
        if stale:
            emb = await self._embed_cached([t.name for t in stale])
            self.store.put(
                [replace(t, embedding=e, text_model=info.text_model_version) for t, e in zip(stale, emb, strict=True)]
            )
            log.info("re-embedded tags for a new text model", extra={"tags": len(stale)})

    def _load_head_dir(self) -> None:
        heads_dir = self.settings.heads_dir
        if not heads_dir.is_dir():
            log.info("no heads directory; serving ConSE only", extra={"heads_dir": str(heads_dir)})
            return
        for path in sorted(heads_dir.glob("*.npz")):
            try:
                head = self._load_file(path)
            except ImgsearchError as exc:
                log.warning("skipping head file", extra={"path": str(path), "reason": exc.message})
                continue
            self.heads[head_id(head)] = head
            self._aliases[path.stem] = head_id(head)

    def _load_file(self, path: Path) -> Head:
        assert self.info is not None
        return load_head(
            path,
            image_model=self.info.image_model_version,
            feature_dim=self.info.feature_dim,
            text_dim=self.info.text_dim,
            conse=self.conse,
        )

    def _pick_default(self) -> Head:
        try:
            return self._resolve(self.settings.default_head)
        except ImgsearchError as exc:
            assert self.conse is not None
            log.warning("default head unavailable, serving ConSE", extra={"reason": exc.message})
            return self.conse

    def _resolve(self, spec: str) -> Head:
        """A head by id (name@version), file alias, or name (the newest loaded version)."""
        if spec in self.heads:
            return self.heads[spec]
        if spec in self._aliases:
            return self.heads[self._aliases[spec]]
        named = [h for h in self.heads.values() if h.name == spec]
        if named:
            return max(named, key=lambda h: h.version)
        raise NotFound(f"no head {spec!r}; loaded: {', '.join(sorted(self.heads))}")

    # ---- reads ----------------------------------------------------------------------------------

    @property
    def state(self) -> VocabState:
        if self._state is None:
            raise FailedPrecondition("the tagger is still starting")
        return self._state

    def _check_signals(self, head: Head, features: Matrix, logits: Matrix | None) -> None:
        assert self.info is not None
        if features.ndim != 2 or features.shape[1] != self.info.feature_dim:
            raise InvalidArgument(f"image features must have {self.info.feature_dim} values")
        if head.needs_logits:
            if logits is None or logits.shape[0] != features.shape[0]:
                raise InvalidArgument(f"head {head_id(head)} needs ImageNet logits for every image")
            if logits.shape[1] != len(self.info.class_labels):
                raise InvalidArgument(f"logits must have {len(self.info.class_labels)} values")

    def project_images(self, features: Matrix, logits: Matrix | None) -> tuple[Matrix, str]:
        state = self.state
        self._check_signals(state.head, features, logits)
        return state.head.project_images(features, logits), state.head_id

    def project_texts(self, embeddings: Matrix) -> tuple[Matrix, str]:
        state = self.state
        assert self.info is not None
        if embeddings.ndim != 2 or embeddings.shape[1] != self.info.text_dim:
            raise InvalidArgument(f"text embeddings must have {self.info.text_dim} values")
        return state.head.project_texts(embeddings), state.head_id

    def rank(self, features: Matrix, logits: Matrix | None, top_k: int, which: str) -> tuple[list[RankedTag], str, int]:
        """Top-k tags for one image: one matrix-vector product over the whole vocabulary."""
        start = time.perf_counter()
        state = self.state
        if not 1 <= top_k <= self.settings.max_k:
            raise InvalidArgument(f"top_k must be between 1 and {self.settings.max_k}, got {top_k}")
        self._check_signals(state.head, features[None, :], None if logits is None else logits[None, :])
        direction = state.head.tag_direction(features[None, :], None if logits is None else logits[None, :])[0]
        scores = state.projected @ direction + state.bias
        if which == "seen":
            scores = np.where(state.seen, scores, -np.inf)
        elif which == "unseen":
            scores = np.where(state.seen, -np.inf, scores)
        eligible = int(np.isfinite(scores).sum())
        k = min(top_k, eligible)
        if k == 0:
            return [], state.head_id, state.size
        top = np.argpartition(-scores, k - 1)[:k]
        top = top[np.argsort(-scores[top], kind="stable")]
        ranked = [RankedTag(state.names[i], float(scores[i]), bool(state.seen[i])) for i in top]
        metrics.RANK_SECONDS.observe(time.perf_counter() - start)
        return ranked, state.head_id, state.size

    def list_tags(self, which: str, page_size: int, page_token: str) -> tuple[list[TagInfo], str, int]:
        state = self.state
        if page_size == 0:
            page_size = 100
        if page_size > 1000:
            raise InvalidArgument(f"page_size must be at most 1000, got {page_size}")
        after = ""
        if page_token:
            try:
                after = base64.urlsafe_b64decode(page_token.encode()).decode("utf-8")
            except (ValueError, UnicodeDecodeError):
                raise InvalidArgument("page_token is not one this server issued") from None
        mask = np.ones(state.size, dtype=bool)
        if which == "seen":
            mask = state.seen
        elif which == "unseen":
            mask = ~state.seen
        # Added tags are appended to the snapshot, so its order is not the key order.
        order = sorted((i for i in range(state.size) if mask[i]), key=lambda i: state.keys[i])
        total = len(order)
        start = 0
        if after:
            start = next((n for n, i in enumerate(order) if state.keys[i] > after), total)
        page = order[start : start + page_size]
        token = ""
        if start + page_size < total and page:
            token = base64.urlsafe_b64encode(state.keys[page[-1]].encode("utf-8")).decode()
        return [TagInfo(state.names[i], bool(state.seen[i]), int(state.added_ms[i])) for i in page], token, total

    # ---- writes ---------------------------------------------------------------------------------

    def _check_batch(self, tags: Sequence[str]) -> None:
        if not tags:
            raise InvalidArgument("no tags given")
        if len(tags) > self.settings.max_tags_per_request:
            raise ResourceExhausted(
                f"{len(tags)} tags in one request; the limit is {self.settings.max_tags_per_request}"
            )

    async def add_tags(self, raw_tags: Sequence[str]) -> list[TagChange]:
        """Validate, embed and durably store new (unseen) tags; they rank from the next call on."""
        self._check_batch(raw_tags)
        start = time.perf_counter()
        async with self._write:
            state = self.state
            assert self.info is not None
            existing = set(state.keys)
            results: list[TagChange] = []
            new: dict[str, str] = {}  # key -> display name
            for raw in raw_tags:
                try:
                    name = clean_tag(raw, self.settings.max_tag_chars)
                except InvalidArgument as exc:
                    results.append(TagChange(raw, error=InvalidArgument(f"tag {raw!r}: {exc.message}")))
                    continue
                key = tag_key(name)
                if key in existing or key in new:
                    results.append(TagChange(name, changed=False))
                elif state.size + len(new) >= self.settings.max_vocabulary:
                    results.append(
                        TagChange(name, error=ResourceExhausted(f"vocabulary is full ({self.settings.max_vocabulary})"))
                    )
                else:
                    new[key] = name
                    results.append(TagChange(name, changed=True))
            if not new:
                return results
            names = list(new.values())
            embedded = await self.source.encode_texts(names, timeout=self.settings.peer_timeout_seconds)
            failed: dict[str, ImgsearchError] = {}
            stored: list[StoredTag] = []
            ts = now_ms()
            for name, res in zip(names, embedded, strict=True):
                if isinstance(res, ImgsearchError):
                    failed[tag_key(name)] = res
                else:
                    stored.append(StoredTag(tag_key(name), name, False, ts, self.info.text_model_version, res))
            if stored:
                await asyncio.to_thread(self.store.put, stored)
                self._state = _append(state, stored)
            results = [
                TagChange(r.tag, changed=False, error=failed[tag_key(r.tag)])
                if r.changed and tag_key(r.tag) in failed
                else r
                for r in results
            ]
        metrics.TAG_ADD_SECONDS.observe(time.perf_counter() - start)
        self._publish_metrics()
        return results

    async def remove_tags(self, raw_tags: Sequence[str]) -> list[TagChange]:
        self._check_batch(raw_tags)
        async with self._write:
            state = self.state
            index = {k: i for i, k in enumerate(state.keys)}
            results: list[TagChange] = []
            drop: set[int] = set()
            for raw in raw_tags:
                try:
                    name = clean_tag(raw, self.settings.max_tag_chars)
                except InvalidArgument as exc:
                    results.append(TagChange(raw, error=InvalidArgument(f"tag {raw!r}: {exc.message}")))
                    continue
                i = index.get(tag_key(name))
                if i is None:
                    results.append(TagChange(name, error=NotFound(f"tag {name!r} is not in the vocabulary")))
                elif i in drop:
                    results.append(TagChange(name, changed=False))
                else:
                    drop.add(i)
                    results.append(TagChange(state.names[i], changed=True))
            if drop:
                await asyncio.to_thread(self.store.delete, [state.keys[i] for i in drop])
                self._state = _remove(state, drop)
        self._publish_metrics()
        return results

    # ---- heads ----------------------------------------------------------------------------------

    def list_heads(self) -> tuple[list[Head], str]:
        return sorted(self.heads.values(), key=head_id), self.state.head_id

    async def activate_head(self, spec: str) -> tuple[Head, str]:
        """Switch heads at run time; in-flight requests finish on the snapshot they started with."""
        if not spec.strip():
            raise InvalidArgument("head is empty: give a name, name@version or the path of a head file")
        async with self._write:
            previous = self.state
            path = Path(spec)
            if spec.endswith(".npz"):
                head = await asyncio.to_thread(self._load_file, path)
                self.heads[head_id(head)] = head
            else:
                head = self._resolve(spec)
            assert self.info is not None
            stored = await asyncio.to_thread(self.store.load)
            self._state = await asyncio.to_thread(_build_state, head, stored, self.info.text_dim)
        self._publish_metrics()
        log.info("head activated", extra={"head": head_id(head), "previous": previous.head_id})
        return head, previous.head_id

    def _publish_metrics(self) -> None:
        state = self._state
        if state is None:
            return
        seen = int(state.seen.sum())
        metrics.VOCABULARY_SIZE.labels("seen").set(seen)
        metrics.VOCABULARY_SIZE.labels("unseen").set(state.size - seen)
        for hid, head in self.heads.items():
            metrics.HEAD_INFO.labels(hid, head.kind).set(1 if hid == state.head_id else 0)

    def close(self) -> None:
        self.store.close()


def _append(state: VocabState, tags: Sequence[StoredTag]) -> VocabState:
    """New snapshot with tags added, projecting only the new rows (keeps adds O(new), not O(vocab))."""
    raw_new = np.stack([t.embedding for t in tags]).astype(np.float32)
    proj_new = state.head.project_texts(raw_new)
    return VocabState(
        head=state.head,
        keys=[*state.keys, *(t.key for t in tags)],
        names=[*state.names, *(t.name for t in tags)],
        seen=np.concatenate([state.seen, np.array([t.seen for t in tags], dtype=bool)]),
        added_ms=np.concatenate([state.added_ms, np.array([t.added_ms for t in tags], dtype=np.int64)]),
        raw=np.concatenate([state.raw, raw_new]),
        projected=np.concatenate([state.projected, proj_new]),
        bias=np.concatenate([state.bias, state.head.tag_bias(proj_new)]),
    )


def _remove(state: VocabState, drop: set[int]) -> VocabState:
    keep = np.array([i for i in range(state.size) if i not in drop], dtype=np.int64)
    return VocabState(
        head=state.head,
        keys=[state.keys[i] for i in keep],
        names=[state.names[i] for i in keep],
        seen=state.seen[keep],
        added_ms=state.added_ms[keep],
        raw=state.raw[keep],
        projected=state.projected[keep],
        bias=state.bias[keep],
    )
