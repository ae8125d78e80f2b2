"""Tagger core: the live tag vocabulary (owned by one writer, followed by read replicas) and tag ranking."""

from __future__ import annotations

import asyncio
import base64
import logging
import re
import threading
import time
import unicodedata
from abc import ABC, abstractmethod
from collections.abc import AsyncGenerator, Iterator, Sequence
from dataclasses import dataclass, field, replace
from importlib import resources

import numpy as np
import numpy.typing as npt

from imgsearch.heads import Head, HeadCatalog, TextSource, head_id, wait_for_model_info
from imgsearch.kit.convert import Matrix
from imgsearch.kit.errors import (
    FailedPrecondition,
    ImgsearchError,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unavailable,
)
from imgsearch.models.manifest import ModelInfo
from imgsearch.tagger import metrics
from imgsearch.tagger.settings import TaggerSettings
from imgsearch.tagger.store import StoredTag, VocabularyStore, now_ms, tag_key

log = logging.getLogger(__name__)

_SPACES = re.compile(r"\s+")
# Tags per snapshot message of WatchVocabulary: about 3.4 MB at 384 dims, far below the message limit.
SNAPSHOT_CHUNK = 2048
# Changes a watcher may have queued; one that falls further behind is dropped and reconnects for a snapshot.
WATCH_QUEUE = 1024
# An idle change feed sends a heartbeat this often: well inside keepalive and ping-abuse limits.
WATCH_HEARTBEAT_SECONDS = 15.0
# EncodeTexts calls one AddTags keeps in flight: enough to overlap, few enough not to crowd out others.
EMBED_CONCURRENCY = 4
READ_REPLICA = "this tagger is a read replica; vocabulary changes go to the writer"


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


# Class labels that are glosses rather than names, and the short name each one is tagged as.
_SHORT_NAMES = {
    "a cat having a striped coat": "tabby cat",
    "tights for gymnastics, a one-piece leotard, or a sport jersey": "leotard",
    "vaulted or arched ceiling": "vaulted ceiling",
    "traffic or street sign": "traffic sign",
    "fruiting spike of a cereal plant": "ear of grain",
    "desert grassland whiptail lizard": "whiptail lizard",
    "bouvier des flandres dog": "Bouvier des Flandres",
    "hen of the woods mushroom": "hen of the woods",
}
_GLOSS = re.compile(r"\s*\([^)]*\)")


def short_name(label: str) -> str:
    """A clean short tag for a class label: a listed short name, else the label without its parenthesised
    gloss, cut at the first ' / ', ',' or ' or ' (the first of several names), without a leading article."""
    listed = _SHORT_NAMES.get(label.casefold())
    if listed is not None:
        return listed
    name = _GLOSS.sub("", label)
    for sep in (" / ", ",", " or "):
        name = name.split(sep)[0]
    name = re.sub(r"^(a|an) ", "", name.strip())
    return _SPACES.sub(" ", name).strip() or label


def starter_vocabulary(class_labels: Sequence[str]) -> list[str]:
    """Short ImageNet class names plus common everyday words, deduplicated case-insensitively."""
    text = resources.files("imgsearch.tagger").joinpath("everyday_words.txt").read_text(encoding="utf-8")
    words = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]
    seen: dict[str, str] = {}
    for name in [*(short_name(c) for c in class_labels), *words]:
        seen.setdefault(tag_key(name), name)
    return list(seen.values())


# ---- snapshots ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HeadView:
    """The vocabulary as one head sees it: projected tag embeddings and per-tag score corrections."""

    head: Head
    projected: Matrix
    bias: Matrix


def project(head: Head, raw: Matrix) -> HeadView:
    projected = head.project_texts(raw) if raw.shape[0] else raw
    return HeadView(head=head, projected=projected, bias=head.tag_bias(projected))


@dataclass(frozen=True, eq=False)
class Vocabulary:
    """An immutable snapshot: requests hold one for their whole duration, writers swap in a new one.

    `views` caches, per head id, the projection of exactly these rows. It is filled lazily, the first time
    a head ranks this snapshot, and carried over incrementally into the next snapshot, so a projection can
    never mix rows of two vocabulary versions.
    """

    version: int
    text_model: str
    dim: int
    keys: list[str]
    names: list[str]
    seen: npt.NDArray[np.bool_]
    added_ms: npt.NDArray[np.int64]
    raw: Matrix
    views: dict[str, HeadView] = field(default_factory=dict)

    @property
    def size(self) -> int:
        return len(self.keys)

    def tags(self) -> Iterator[StoredTag]:
        for i, key in enumerate(self.keys):
            yield StoredTag(key, self.names[i], bool(self.seen[i]), int(self.added_ms[i]), self.text_model, self.raw[i])


def build_vocabulary(tags: Sequence[StoredTag], version: int, text_model: str, dim: int) -> Vocabulary:
    raw = np.stack([t.embedding for t in tags]).astype(np.float32) if tags else np.zeros((0, dim), dtype=np.float32)
    return Vocabulary(
        version=version,
        text_model=text_model,
        dim=dim,
        keys=[t.key for t in tags],
        names=[t.name for t in tags],
        seen=np.array([t.seen for t in tags], dtype=bool),
        added_ms=np.array([t.added_ms for t in tags], dtype=np.int64),
        raw=raw,
    )


@dataclass(frozen=True)
class VocabUpdate:
    """One message of the writer's vocabulary stream: part of a full snapshot, or one change."""

    version: int
    text_model: str
    dim: int
    added: Sequence[StoredTag] = ()
    removed: Sequence[str] = ()
    # First part of a snapshot: the receiver drops what it holds.
    reset: bool = False
    # The receiver now holds the writer's vocabulary at `version` (last snapshot part; every change).
    complete: bool = True


def snapshot_updates(vocab: Vocabulary) -> Iterator[VocabUpdate]:
    """A snapshot as stream messages of at most SNAPSHOT_CHUNK tags each."""
    tags = list(vocab.tags())
    starts = range(0, max(len(tags), 1), SNAPSHOT_CHUNK)
    for n, start in enumerate(starts):
        yield VocabUpdate(
            version=vocab.version,
            text_model=vocab.text_model,
            dim=vocab.dim,
            added=tags[start : start + SNAPSHOT_CHUNK],
            reset=n == 0,
            complete=n == len(starts) - 1,
        )


def apply_change(vocab: Vocabulary, update: VocabUpdate, views: dict[str, HeadView]) -> Vocabulary:
    """The next snapshot: rows removed, then rows appended; `views` (of `vocab`) are updated incrementally.

    Appending projects only the new rows, so an add costs O(new tags), not O(vocabulary), per cached head.
    """
    gone = set(update.removed)
    keep = np.array([i for i, k in enumerate(vocab.keys) if k not in gone], dtype=np.int64)
    added = list(update.added)
    raw_new = (
        np.stack([t.embedding for t in added]).astype(np.float32)
        if added
        else np.zeros((0, vocab.dim), dtype=np.float32)
    )
    next_views: dict[str, HeadView] = {}
    for hid, view in views.items():
        fresh = project(view.head, raw_new)
        next_views[hid] = HeadView(
            head=view.head,
            projected=np.concatenate([view.projected[keep], fresh.projected]),
            bias=np.concatenate([view.bias[keep], fresh.bias]),
        )
    return Vocabulary(
        version=update.version,
        text_model=vocab.text_model,
        dim=vocab.dim,
        keys=[*(vocab.keys[i] for i in keep), *(t.key for t in added)],
        names=[*(vocab.names[i] for i in keep), *(t.name for t in added)],
        seen=np.concatenate([vocab.seen[keep], np.array([t.seen for t in added], dtype=bool)]),
        added_ms=np.concatenate([vocab.added_ms[keep], np.array([t.added_ms for t in added], dtype=np.int64)]),
        raw=np.concatenate([vocab.raw[keep], raw_new]),
        views=next_views,
    )


# ---- results --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RankedTag:
    tag: str
    score: float
    seen: bool


@dataclass(frozen=True)
class Ranking:
    tags: list[RankedTag]
    head: str
    vocabulary_size: int
    vocabulary_version: int


@dataclass(frozen=True)
class TagChange:
    """Outcome of one tag in an add or remove."""

    tag: str
    changed: bool = False
    error: ImgsearchError | None = None


@dataclass(frozen=True)
class TagChanges:
    """Outcome of an add or remove: one result per requested tag, and the vocabulary version after it."""

    results: list[TagChange]
    version: int


@dataclass(frozen=True)
class TagInfo:
    name: str
    seen: bool
    added_ms: int


@dataclass(frozen=True)
class TagPage:
    tags: list[TagInfo]
    next_page_token: str
    total: int
    vocabulary_version: int


# ---- the core -------------------------------------------------------------------------------------


class Tagger(ABC):
    """Ranking over the live vocabulary, under any head of the catalog; reads are lock-free on a snapshot.

    The base class only reads: VocabularyWriter owns and changes the vocabulary, ReadReplica follows one.
    """

    role = "base"

    def __init__(self, settings: TaggerSettings, source: TextSource) -> None:
        self.settings = settings
        self.source = source
        self._catalog: HeadCatalog | None = None
        self._default: Head | None = None
        self._vocab: Vocabulary | None = None
        self._changed = asyncio.Event()
        # Only building a head's view takes it (rank runs in worker threads); reads of a built view do not.
        self._views_lock = threading.Lock()

    # ---- state --------------------------------------------------------------------------------------

    @property
    def vocabulary(self) -> Vocabulary:
        if self._vocab is None:
            # UNAVAILABLE, not FAILED_PRECONDITION: clients' retry policies retry it, another replica may answer.
            raise Unavailable("the tagger is still starting; retry shortly")
        return self._vocab

    @property
    def catalog(self) -> HeadCatalog:
        if self._catalog is None:
            raise Unavailable("the tagger is still starting; retry shortly")
        return self._catalog

    @property
    def default_head(self) -> Head:
        if self._default is None:
            raise Unavailable("the tagger is still starting; retry shortly")
        return self._default

    def _set_catalog(self, catalog: HeadCatalog) -> None:
        self._catalog = catalog
        self._default = catalog.default(self.settings.default_head)
        for head in catalog.all():
            metrics.HEAD_INFO.labels(head_id(head), head.kind).set(1 if head is self._default else 0)

    def _publish(self, vocab: Vocabulary) -> None:
        """Swap in a new snapshot and wake requests waiting for a version."""
        self._vocab = vocab
        self._changed.set()
        self._changed = asyncio.Event()
        seen = int(vocab.seen.sum())
        metrics.VOCABULARY_SIZE.labels("seen").set(seen)
        metrics.VOCABULARY_SIZE.labels("unseen").set(vocab.size - seen)
        metrics.VOCABULARY_VERSION.set(vocab.version)

    def _views_of(self, vocab: Vocabulary) -> dict[str, HeadView]:
        with self._views_lock:
            return dict(vocab.views)

    def _warm(self, vocab: Vocabulary) -> Vocabulary:
        """Project a fresh snapshot for the default head up front, so the first RankTags does not pay for it."""
        self.view(vocab, self.default_head)
        return vocab

    # ---- reads --------------------------------------------------------------------------------------

    async def wait_for_version(self, version: int) -> Vocabulary:
        """The current snapshot once it has `version`, or after version_wait_seconds, whichever is first."""
        vocab = self.vocabulary
        if version <= vocab.version:
            return vocab
        deadline = time.monotonic() + self.settings.version_wait_seconds
        while vocab.version < version:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                await asyncio.wait_for(self._changed.wait(), remaining)
            except TimeoutError:
                break
            vocab = self.vocabulary
        return self.vocabulary

    def head(self, spec: str) -> Head:
        """The head a request names (id or name), or the default head when it names none."""
        return self.default_head if not spec.strip() else self.catalog.resolve(spec)

    def view(self, vocab: Vocabulary, head: Head) -> HeadView:
        """The snapshot projected by a head, built on first use; at most max_cached_heads are kept."""
        hid = head_id(head)
        view = vocab.views.get(hid)
        if view is not None:
            return view
        with self._views_lock:
            view = vocab.views.get(hid)
            if view is None:
                view = project(head, vocab.raw)
                while len(vocab.views) >= self.settings.max_cached_heads:
                    vocab.views.pop(next(iter(vocab.views)))
                vocab.views[hid] = view
        return view

    def rank(
        self,
        features: Matrix,
        logits: Matrix | None,
        top_k: int,
        which: str,
        head: str = "",
        vocab: Vocabulary | None = None,
    ) -> Ranking:
        """Top-k tags for one image under a head: one matrix-vector product over the whole vocabulary."""
        start = time.perf_counter()
        vocab = self.vocabulary if vocab is None else vocab
        chosen = self.head(head)
        if top_k < 1:
            raise InvalidArgument(f"top_k must be at least 1 (at most the vocabulary's size counts), got {top_k}")
        lg = None if logits is None else logits[None, :]
        self.catalog.check_signals(chosen, features[None, :], lg)
        view = self.view(vocab, chosen)
        direction = chosen.tag_direction(features[None, :], lg)[0]
        scores = view.projected @ direction + view.bias
        if which == "seen":
            scores = np.where(vocab.seen, scores, -np.inf)
        elif which == "unseen":
            scores = np.where(vocab.seen, -np.inf, scores)
        k = min(top_k, int(np.isfinite(scores).sum()))
        ranked: list[RankedTag] = []
        if k > 0:
            top = np.argpartition(-scores, k - 1)[:k]
            top = top[np.argsort(-scores[top], kind="stable")]
            ranked = [RankedTag(vocab.names[i], float(scores[i]), bool(vocab.seen[i])) for i in top]
        metrics.RANK_SECONDS.observe(time.perf_counter() - start)
        return Ranking(ranked, head_id(chosen), vocab.size, vocab.version)

    def list_tags(self, which: str, page_size: int, page_token: str, vocab: Vocabulary | None = None) -> TagPage:
        vocab = self.vocabulary if vocab is None else vocab
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
        mask = np.ones(vocab.size, dtype=bool)
        if which == "seen":
            mask = vocab.seen
        elif which == "unseen":
            mask = ~vocab.seen
        # Added tags are appended to the snapshot, so its order is not the key order.
        order = sorted((i for i in range(vocab.size) if mask[i]), key=lambda i: vocab.keys[i])
        total = len(order)
        start = 0
        if after:
            start = next((n for n, i in enumerate(order) if vocab.keys[i] > after), total)
        page = order[start : start + page_size]
        token = ""
        if start + page_size < total and page:
            token = base64.urlsafe_b64encode(vocab.keys[page[-1]].encode("utf-8")).decode()
        infos = [TagInfo(vocab.names[i], bool(vocab.seen[i]), int(vocab.added_ms[i])) for i in page]
        return TagPage(infos, token, total, vocab.version)

    def list_heads(self) -> tuple[list[Head], str]:
        """Every head this tagger can rank under, and its default one."""
        return self.catalog.all(), head_id(self.default_head)

    # ---- writes (the writer overrides these) ------------------------------------------------------

    async def add_tags(self, raw_tags: Sequence[str]) -> TagChanges:
        raise FailedPrecondition(READ_REPLICA)

    async def remove_tags(self, raw_tags: Sequence[str]) -> TagChanges:
        raise FailedPrecondition(READ_REPLICA)

    def watch(self) -> AsyncGenerator[VocabUpdate, None]:
        raise FailedPrecondition("this tagger is a read replica; watch the writer's vocabulary instead")

    @abstractmethod
    async def start(self) -> None:
        """Load what ranking needs (each role gets its vocabulary its own way); health turns SERVING after."""

    async def close(self) -> None:
        return None


@dataclass(eq=False)  # identity: watchers live in a set
class _Watcher:
    queue: asyncio.Queue[VocabUpdate] = field(default_factory=lambda: asyncio.Queue(WATCH_QUEUE))
    overflowed: bool = False
    # Set when the writer drains: the stream ends cleanly and the replica reconnects to the next writer.
    ended: asyncio.Event = field(default_factory=asyncio.Event)


async def _next_or_end(watcher: _Watcher, timeout: float) -> VocabUpdate | None:
    """The watcher's next change, None once it was ended; TimeoutError when idle for `timeout`."""
    get = asyncio.ensure_future(watcher.queue.get())
    end = asyncio.ensure_future(watcher.ended.wait())
    try:
        done, _ = await asyncio.wait({get, end}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (get, end):
            if not task.done():
                task.cancel()
    if get in done:
        return get.result()
    if end in done:
        return None
    raise TimeoutError


class VocabularyWriter(Tagger):
    """The one tagger that owns the durable vocabulary (SQLite): adds, removes, the version, the change feed.

    Every change is committed together with the incremented version before it is acknowledged or
    published, so the version a caller gets back names a state that survives a crash, and versions never
    go back across restarts of the same data directory.
    """

    role = "writer"

    def __init__(self, settings: TaggerSettings, source: TextSource) -> None:
        super().__init__(settings, source)
        self.store = VocabularyStore(settings.data_dir / "vocabulary.sqlite3")
        self._write = asyncio.Lock()
        self._watchers: set[_Watcher] = set()

    # ---- start-up -----------------------------------------------------------------------------------

    async def start(self) -> None:
        """Wait for the encoder, embed class names and the starter vocabulary (cached), load the heads."""
        s = self.settings
        info = await wait_for_model_info(self.source, s.peer_timeout_seconds, s.startup_timeout_seconds)
        class_emb = await self._embed_cached(info, info.class_labels)
        catalog = await asyncio.to_thread(
            HeadCatalog.load,
            info,
            class_emb,
            s.heads_dir,
            conse_top_t=s.conse_top_t,
            anchor_penalty=s.anchor_penalty,
        )
        self._set_catalog(catalog)
        await self._seed_and_refresh(info)
        stored = await asyncio.to_thread(self.store.load)
        vocab = build_vocabulary(stored, self.store.version(), info.text_model_version, info.text_dim)
        self._publish(await asyncio.to_thread(self._warm, vocab))
        log.info(
            "tagger ready",
            extra={
                "role": self.role,
                "default_head": head_id(self.default_head),
                "vocabulary": vocab.size,
                "version": vocab.version,
                "heads": [head_id(h) for h in catalog.all()],
            },
        )

    async def _embed_cached(self, info: ModelInfo, texts: Sequence[str]) -> Matrix:
        """Embeddings of texts that must all succeed, reusing those cached for this text model."""
        model = info.text_model_version
        cached = await asyncio.to_thread(self.store.cached_embeddings, model, texts)
        missing = [t for t in dict.fromkeys(texts) if t not in cached]
        size = self.settings.encode_batch_size
        for start in range(0, len(missing), size):
            chunk = missing[start : start + size]
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
            emb = await self._embed_cached(info, names)
            ts = now_ms()
            tags = [
                StoredTag(tag_key(n), n, True, ts, info.text_model_version, e) for n, e in zip(names, emb, strict=True)
            ]
            await asyncio.to_thread(self.store.put, tags, self.store.version() + 1)
            # Seed once: a starter tag an operator removed must stay removed after a restart.
            self.store.set_meta("seeded", str(ts))
            log.info("seeded starter vocabulary", extra={"tags": len(names)})
        stale = [t for t in self.store.load() if t.text_model != info.text_model_version]
        if stale:
            emb = await self._embed_cached(info, [t.name for t in stale])
            fresh = [
                replace(t, embedding=e, text_model=info.text_model_version) for t, e in zip(stale, emb, strict=True)
            ]
            await asyncio.to_thread(self.store.put, fresh, self.store.version() + 1)
            log.info("re-embedded tags for a new text model", extra={"tags": len(stale)})

    # ---- writes -------------------------------------------------------------------------------------

    def _check_batch(self, tags: Sequence[str]) -> None:
        if not tags:
            raise InvalidArgument("no tags given")
        if len(tags) > self.settings.max_tags_per_request:
            raise ResourceExhausted(
                f"{len(tags)} tags in one request; the limit is {self.settings.max_tags_per_request}: split them"
            )

    async def _embed_new(self, names: Sequence[str]) -> list[Matrix | ImgsearchError]:
        """One embedding or error per name, in encoder-sized chunks; a failed call fails only its chunk."""
        size = self.settings.encode_batch_size
        chunks = [list(names[i : i + size]) for i in range(0, len(names), size)]
        gate = asyncio.Semaphore(EMBED_CONCURRENCY)

        async def one(chunk: list[str]) -> list[Matrix | ImgsearchError] | ImgsearchError:
            async with gate:
                try:
                    results = await self.source.encode_texts(chunk, timeout=self.settings.peer_timeout_seconds)
                except ImgsearchError as exc:
                    return exc
            if len(results) != len(chunk):
                return Unavailable(f"the encoder answered {len(results)} results for {len(chunk)} texts")
            return results

        parts = await asyncio.gather(*(one(c) for c in chunks))
        failures = [p for p in parts if isinstance(p, ImgsearchError)]
        if len(failures) == len(parts):
            # Nothing could be embedded: fail the call with the encoder's status, so callers may retry it.
            raise failures[0]
        out: list[Matrix | ImgsearchError] = []
        for chunk, part in zip(chunks, parts, strict=True):
            out.extend([part] * len(chunk) if isinstance(part, ImgsearchError) else part)
        return out

    async def add_tags(self, raw_tags: Sequence[str]) -> TagChanges:
        """Validate, embed and durably store new (unseen) tags; they rank from the next call on."""
        self._check_batch(raw_tags)
        start = time.perf_counter()
        async with self._write:
            vocab = self.vocabulary
            existing = set(vocab.keys)
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
                elif vocab.size + len(new) >= self.settings.max_vocabulary:
                    results.append(
                        TagChange(name, error=ResourceExhausted(f"vocabulary is full ({self.settings.max_vocabulary})"))
                    )
                else:
                    new[key] = name
                    results.append(TagChange(name, changed=True))
            if not new:
                return TagChanges(results, vocab.version)
            names = list(new.values())
            embedded = await self._embed_new(names)
            failed: dict[str, ImgsearchError] = {}
            stored: list[StoredTag] = []
            ts = now_ms()
            for name, res in zip(names, embedded, strict=True):
                if isinstance(res, ImgsearchError):
                    failed[tag_key(name)] = res
                else:
                    stored.append(StoredTag(tag_key(name), name, False, ts, vocab.text_model, res))
            version = vocab.version
            if stored:
                version += 1
                await asyncio.to_thread(self.store.put, stored, version)
                self._apply(VocabUpdate(version, vocab.text_model, vocab.dim, added=stored))
            results = [
                TagChange(r.tag, changed=False, error=failed[tag_key(r.tag)])
                if r.changed and tag_key(r.tag) in failed
                else r
                for r in results
            ]
        metrics.TAG_ADD_SECONDS.observe(time.perf_counter() - start)
        return TagChanges(results, version)

    async def remove_tags(self, raw_tags: Sequence[str]) -> TagChanges:
        self._check_batch(raw_tags)
        async with self._write:
            vocab = self.vocabulary
            index = {k: i for i, k in enumerate(vocab.keys)}
            results: list[TagChange] = []
            drop: dict[str, None] = {}
            for raw in raw_tags:
                try:
                    name = clean_tag(raw, self.settings.max_tag_chars)
                except InvalidArgument as exc:
                    results.append(TagChange(raw, error=InvalidArgument(f"tag {raw!r}: {exc.message}")))
                    continue
                key = tag_key(name)
                i = index.get(key)
                if i is None:
                    results.append(TagChange(name, error=NotFound(f"tag {name!r} is not in the vocabulary")))
                elif key in drop:
                    results.append(TagChange(name, changed=False))
                else:
                    drop[key] = None
                    results.append(TagChange(vocab.names[i], changed=True))
            version = vocab.version
            if drop:
                version += 1
                await asyncio.to_thread(self.store.delete, list(drop), version)
                self._apply(VocabUpdate(version, vocab.text_model, vocab.dim, removed=list(drop)))
        return TagChanges(results, version)

    def _apply(self, update: VocabUpdate) -> None:
        """Publish a committed change to local readers and every watcher, with no await in between.

        Because nothing yields to the event loop between the swap and the fan-out, a watcher that takes its
        snapshot and registers in one step (see watch) sees every later change exactly once.
        """
        vocab = self.vocabulary
        self._publish(apply_change(vocab, update, self._views_of(vocab)))
        for watcher in self._watchers:
            try:
                watcher.queue.put_nowait(update)
            except asyncio.QueueFull:
                watcher.overflowed = True

    # ---- change feed --------------------------------------------------------------------------------

    async def watch(self) -> AsyncGenerator[VocabUpdate, None]:
        """A full snapshot (in parts), then every change in commit order, until the caller goes away.

        An idle stream carries a heartbeat (no tags, same version) every WATCH_HEARTBEAT_SECONDS: data on
        the stream keeps the server from treating the watcher's keepalive pings as abuse, and lets the
        watcher tell a quiet writer from a dead connection.
        """
        vocab = self.vocabulary
        watcher = _Watcher()
        self._watchers.add(watcher)
        metrics.WATCHERS.inc()
        try:
            for part in snapshot_updates(vocab):
                yield part
            # A stream lives for hours: do not pin the snapshot it started from.
            del vocab
            while True:
                if watcher.ended.is_set():
                    return
                try:
                    update = await _next_or_end(watcher, WATCH_HEARTBEAT_SECONDS)
                except TimeoutError:
                    # An empty queue means the watcher has every change: the current version is its own.
                    now = self.vocabulary
                    yield VocabUpdate(now.version, now.text_model, now.dim)
                    continue
                if watcher.overflowed:
                    raise Unavailable(
                        f"this watcher fell more than {WATCH_QUEUE} changes behind; reconnect for a fresh snapshot"
                    )
                if update is None:
                    return
                yield update
        finally:
            self._watchers.discard(watcher)
            metrics.WATCHERS.dec()

    def end_watches(self) -> None:
        """End every change feed now (at drain), so open streams do not hold the shutdown for its grace."""
        for watcher in self._watchers:
            watcher.ended.set()

    async def close(self) -> None:
        self.store.close()
