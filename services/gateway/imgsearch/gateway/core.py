"""Gateway core: validation, routing writes by id, concurrent fan-out of searches and top-k merging."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import heapq
import logging
import time
import unicodedata
from collections import defaultdict
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field

import grpc
import numpy as np

from imgsearch.api.common.v1 import common_pb2
from imgsearch.gateway import metrics
from imgsearch.gateway.heads import Activation, HeadManager, HeadShard, project_images
from imgsearch.gateway.peers import Encoder, Hit, NewRecord, RankedTags, Shard, StoredRecord, Tagger, shard_for
from imgsearch.gateway.settings import GatewaySettings
from imgsearch.heads import HeadCatalog, head_id
from imgsearch.kit.convert import Matrix, check_k, error_code
from imgsearch.kit.errors import (
    FailedPrecondition,
    ImgsearchError,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unavailable,
)
from imgsearch.kit.peers import PeerError

log = logging.getLogger(__name__)

TOP_LOGITS = 32
# Statuses a shard returns because the request itself is wrong: every shard would say the same,
# so they fail the whole call instead of turning it into a partial result.
_CALLER_ERRORS = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.OUT_OF_RANGE,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.UNAUTHENTICATED,
}


@dataclass(frozen=True)
class NewImage:
    """One streamed image as the caller sent it."""

    id: str
    data: bytes
    metadata: dict[str, str]
    source_name: str


@dataclass
class AddResult:
    position: int
    id: str
    error: ImgsearchError | None = None
    created: bool = False


@dataclass
class SearchResult:
    hits: list[Hit]
    space: int
    head: str = ""
    failed_shards: list[str] = field(default_factory=list)
    shards_total: int = 0

    @property
    def partial(self) -> bool:
        return bool(self.failed_shards)


@dataclass
class DeleteOutcome:
    id: str
    error: ImgsearchError | None = None


def top_logits(logits: Matrix, n: int = TOP_LOGITS) -> list[tuple[int, float]]:
    """The n highest (class, logit) pairs: ConSE's top-T weights (T <= n) are exactly recoverable from them."""
    top = np.argpartition(-logits, n - 1)[:n]
    return [(int(i), float(logits[i])) for i in top[np.argsort(-logits[top])]]


def content_id(data: bytes) -> str:
    """Default id: the first 16 hex digits of the image's SHA-256, so re-adding a file is idempotent."""
    return hashlib.sha256(data).hexdigest()[:16]


def _code(exc: ImgsearchError) -> str:
    return str(exc.code.name)


class Gateway:
    """The public API's logic over the encoder, the tagger and the index shards.

    Projection is in process: the heads library turns encoder output into semantic vectors here, so adding
    and searching need only the encoder and the shards; the tagger is called for tagging and vocabulary
    edits alone, and its outage stops only those.
    """

    def __init__(
        self,
        settings: GatewaySettings,
        encoder: Encoder,
        tagger: Tagger,
        shards: Sequence[Shard],
    ) -> None:
        self.settings = settings
        self.encoder = encoder
        self.tagger = tagger
        self.shards = list(shards)
        self._heads: HeadManager | None = None
        self._reconciler: asyncio.Task[None] | None = None
        # Highest vocabulary version this gateway's own tag edits produced: reads ask replicas for at least
        # this one, so a caller sees the tag it just added even when a read replica answers.
        self.vocabulary_version = 0

    async def start(self, catalog: HeadCatalog | None = None) -> None:
        """Load the heads (class names embedded by the encoder), learn the head configuration, reconcile."""
        s = self.settings
        if catalog is None:
            catalog = await HeadCatalog.from_encoder(
                self.encoder,
                s.heads_dir,
                timeout=s.peer_timeout_seconds,
                startup_timeout=s.startup_timeout_seconds,
                conse_top_t=s.conse_top_t,
                anchor_penalty=s.anchor_penalty,
            )
        shards: list[HeadShard] = list(self.shards)
        manager = HeadManager(
            catalog,
            shards,
            default_head=s.default_head,
            timeout=s.peer_timeout_seconds,
            page_size=s.backfill_page_size,
            refresh_seconds=s.head_refresh_seconds,
        )
        await manager.refresh()
        self._heads = manager
        self._reconciler = asyncio.create_task(manager.run())
        log.info("heads loaded", extra={"heads": sorted(catalog.heads), "config": str(manager.config)})

    async def close(self) -> None:
        if self._reconciler is not None:
            self._reconciler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reconciler
        if self._heads is not None:
            await self._heads.close()

    @property
    def heads(self) -> HeadManager:
        if self._heads is None:
            raise Unavailable("the gateway is still starting (loading heads); retry shortly")
        return self._heads

    # ---- validation -----------------------------------------------------------------------------

    def check_id(self, image_id: str, what: str = "id") -> str:
        if not image_id or not image_id.strip():
            raise InvalidArgument(f"{what} is empty" if not image_id else f"{what} is only whitespace")
        if len(image_id) > self.settings.max_id_chars:
            raise InvalidArgument(
                f"{what} is {len(image_id)} characters long, the limit is {self.settings.max_id_chars}"
            )
        if any(unicodedata.category(ch) in ("Cc", "Cs") for ch in image_id):
            raise InvalidArgument(f"{what} {image_id!r} contains control characters")
        return image_id

    def check_image(self, data: bytes, what: str = "image") -> bytes:
        if not data:
            raise InvalidArgument(f"{what} is empty (0 bytes)")
        if len(data) > self.settings.max_image_bytes:
            raise InvalidArgument(f"{what} is {len(data)} bytes, the limit is {self.settings.max_image_bytes} bytes")
        return data

    def check_metadata(self, metadata: dict[str, str], what: str) -> None:
        """The shards' limits, checked before the image is decoded, encoded and projected."""
        s = self.settings
        if len(metadata) > s.max_metadata_entries:
            raise InvalidArgument(f"{what}: {len(metadata)} metadata entries, at most {s.max_metadata_entries} allowed")
        size = sum(len(k.encode()) + len(v.encode()) for k, v in metadata.items())
        if size > s.max_metadata_bytes:
            raise InvalidArgument(f"{what}: metadata is {size} bytes, at most {s.max_metadata_bytes} allowed")
        if any(not k for k in metadata):
            raise InvalidArgument(f"{what}: a metadata key is empty")

    def check_ids(self, ids: Sequence[str]) -> None:
        if not ids:
            raise InvalidArgument("no ids given")
        if len(ids) > self.settings.max_ids_per_request:
            raise ResourceExhausted(f"{len(ids)} ids in one request; the limit is {self.settings.max_ids_per_request}")
        for i, image_id in enumerate(ids):
            self.check_id(image_id, f"id {i}")

    # ---- writes ---------------------------------------------------------------------------------

    async def add_images(self, stream: AsyncIterator[NewImage], timeout: Callable[[], float]) -> list[AddResult]:
        """Encode, project and store streamed images in batches; each image succeeds or fails alone."""
        results: list[AddResult] = []
        batch: list[tuple[int, NewImage]] = []
        position = 0
        async for image in stream:
            batch.append((position, image))
            position += 1
            if len(batch) >= self.settings.add_batch_size:
                results.extend(await self._add_batch(batch, timeout()))
                batch = []
        if batch:
            results.extend(await self._add_batch(batch, timeout()))
        if position == 0:
            raise InvalidArgument("the stream contained no images")
        for r in results:
            metrics.IMAGES_ADDED.labels("error" if r.error else "ok").inc()
        return results

    async def _add_batch(self, batch: list[tuple[int, NewImage]], timeout: float) -> list[AddResult]:
        results: dict[int, AddResult] = {}
        valid: list[tuple[int, NewImage, str]] = []
        for pos, image in batch:
            image_id = image.id or (content_id(image.data) if image.data else "")
            result = AddResult(pos, image_id)
            results[pos] = result
            try:
                self.check_image(image.data, f"image {pos} ({image.source_name or image_id or 'unnamed'})")
                self.check_id(image_id, f"id of image {pos}")
                self.check_metadata(image.metadata, f"image {pos} ({image.source_name or image_id})")
            except ImgsearchError as exc:
                result.error = exc
                continue
            valid.append((pos, image, image_id))
        if valid:
            encoded = await self.encoder.encode_images(
                [(image.data, image.source_name or image_id) for _, image, image_id in valid],
                include_logits=True,
                timeout=timeout,
            )
            good = []
            for (pos, image, image_id), enc in zip(valid, encoded, strict=True):
                if enc.error is not None or enc.features is None:
                    results[pos].error = enc.error or InvalidArgument(f"image {pos} could not be encoded")
                else:
                    good.append((pos, image, image_id, enc.features, enc.logits))
            if good:
                await self._store(good, results, timeout)
        return [results[pos] for pos, _ in batch]

    async def _store(
        self,
        good: list[tuple[int, NewImage, str, Matrix, Matrix | None]],
        results: dict[int, AddResult],
        timeout: float,
    ) -> None:
        features = np.stack([g[3] for g in good])
        logits = None if any(g[4] is None for g in good) else np.stack([g[4] for g in good if g[4] is not None])
        norms = np.linalg.norm(features, axis=1)
        visual = features / np.maximum(norms[:, None], 1e-12)
        pending = list(range(len(good)))
        # A shard refuses records that lack a head its configuration requires (a switch began elsewhere):
        # then this gateway's view is stale, so it refreshes once and writes those records again.
        for attempt in range(2):
            heads = self.heads.write_heads()
            semantics = {
                head_id(h): await asyncio.to_thread(project_images, self.heads.catalog, h, features, logits)
                for h in heads
            }
            stale = await self._write_records(good, pending, visual, norms, logits, semantics, results, timeout)
            if not stale or attempt == 1:
                break
            await self.heads.refresh()
            pending = stale

    async def _write_records(
        self,
        good: list[tuple[int, NewImage, str, Matrix, Matrix | None]],
        rows: list[int],
        visual: Matrix,
        norms: Matrix,
        logits: Matrix | None,
        semantics: dict[str, Matrix],
        results: dict[int, AddResult],
        timeout: float,
    ) -> list[int]:
        """Write the given rows to their shards; returns rows refused for a stale head configuration."""
        by_shard: dict[str, list[tuple[int, NewRecord]]] = defaultdict(list)
        for row in rows:
            _, image, image_id, _, _ = good[row]
            record = NewRecord(
                image_id,
                visual[row],
                {hid: vectors[row] for hid, vectors in semantics.items()},
                image.metadata,
                image.source_name,
                feature_norm=float(norms[row]),
                top_logits=[] if logits is None else top_logits(logits[row]),
            )
            by_shard[shard_for(image_id, self.shards).name].append((row, record))
        shards = {s.name: s for s in self.shards}
        stale: list[int] = []

        async def write(name: str, items: list[tuple[int, NewRecord]]) -> None:
            try:
                written = await shards[name].upsert([r for _, r in items], timeout)
            except ImgsearchError as exc:
                metrics.SHARD_ERRORS.labels(name, _code(exc)).inc()
                for row, _ in items:
                    results[good[row][0]].error = exc
                return
            for (row, _), w in zip(items, written, strict=True):
                result = results[good[row][0]]
                if w.HasField("error"):
                    result.error = PeerError(error_code(w.error), w.error.message)
                    if result.error.code == grpc.StatusCode.FAILED_PRECONDITION:
                        stale.append(row)
                else:
                    result.error = None
                    result.created = w.changed

        await asyncio.gather(*(write(name, items) for name, items in by_shard.items()))
        return sorted(stale)

    async def delete_images(self, ids: Sequence[str], timeout: float) -> tuple[list[DeleteOutcome], bool]:
        self.check_ids(ids)
        outcomes = {i: DeleteOutcome(image_id) for i, image_id in enumerate(ids)}
        groups = self._group(ids)
        partial = False

        async def run(shard: Shard, items: list[tuple[int, str]]) -> None:
            nonlocal partial
            try:
                written = await shard.delete([image_id for _, image_id in items], timeout)
            except ImgsearchError as exc:
                partial = True
                metrics.SHARD_ERRORS.labels(shard.name, _code(exc)).inc()
                for i, _ in items:
                    outcomes[i].error = exc
                return
            for (i, image_id), w in zip(items, written, strict=True):
                if w.HasField("error"):
                    outcomes[i].error = PeerError(error_code(w.error), w.error.message)
                elif not w.changed:
                    outcomes[i].error = NotFound(f"image {image_id!r} is not stored")

        await asyncio.gather(*(run(s, items) for s, items in groups))
        if partial:
            metrics.PARTIAL_RESULTS.labels("DeleteImages").inc()
        return [outcomes[i] for i in range(len(ids))], partial

    def _group(self, ids: Sequence[str]) -> list[tuple[Shard, list[tuple[int, str]]]]:
        groups: dict[str, list[tuple[int, str]]] = defaultdict(list)
        for i, image_id in enumerate(ids):
            groups[shard_for(image_id, self.shards).name].append((i, image_id))
        return [(s, groups[s.name]) for s in self.shards if s.name in groups]

    # ---- reads ----------------------------------------------------------------------------------

    async def get_images(self, ids: Sequence[str], timeout: float) -> tuple[list[StoredRecord], list[str], bool]:
        self.check_ids(ids)
        found: dict[str, StoredRecord] = {}
        missing: list[str] = []
        partial = False

        async def run(shard: Shard, items: list[tuple[int, str]]) -> None:
            nonlocal partial
            try:
                records, miss = await shard.get([image_id for _, image_id in items], False, timeout)
            except ImgsearchError as exc:
                partial = True
                metrics.SHARD_ERRORS.labels(shard.name, _code(exc)).inc()
                return
            found.update({r.id: r for r in records})
            missing.extend(miss)

        await asyncio.gather(*(run(s, items) for s, items in self._group(ids)))
        if partial:
            metrics.PARTIAL_RESULTS.labels("GetImages").inc()
        ordered = [found[i] for i in dict.fromkeys(ids) if i in found]
        return ordered, missing, partial

    async def search_by_image(self, data: bytes, k: int, space: int, timeout: float) -> SearchResult:
        self.check_image(data, "query image")
        check_k(k, self.settings.max_k)
        space = space or common_pb2.SPACE_VISUAL
        semantic = space == common_pb2.SPACE_SEMANTIC
        (enc,) = await self.encoder.encode_images([(data, "query image")], include_logits=semantic, timeout=timeout)
        if enc.error is not None or enc.features is None:
            raise enc.error or InvalidArgument("query image could not be encoded")
        if semantic:
            head = self.heads.active()
            vectors = await asyncio.to_thread(
                project_images,
                self.heads.catalog,
                head,
                enc.features[None, :],
                None if enc.logits is None else enc.logits[None, :],
            )
            return await self.fan_out("SearchByImage", space, vectors[0], k, [], head_id(head), timeout)
        query = enc.features / max(float(np.linalg.norm(enc.features)), 1e-12)
        return await self.fan_out("SearchByImage", space, query, k, [], "", timeout)

    async def search_by_text(self, query: str, k: int, timeout: float) -> SearchResult:
        text = " ".join(query.split())
        if not text:
            raise InvalidArgument("query is empty: give a few words describing the images to find")
        if len(text) > self.settings.max_query_chars:
            raise InvalidArgument(f"query is {len(text)} characters long, the limit is {self.settings.max_query_chars}")
        check_k(k, self.settings.max_k)
        (emb,) = await self.encoder.encode_texts([text], timeout)
        if isinstance(emb, ImgsearchError):
            raise emb
        head = self.heads.active()
        vector = head.project_texts(emb[None, :])[0]
        return await self.fan_out("SearchByText", common_pb2.SPACE_SEMANTIC, vector, k, [], head_id(head), timeout)

    async def search_by_id(self, image_id: str, k: int, space: int, include_self: bool, timeout: float) -> SearchResult:
        self.check_id(image_id)
        check_k(k, self.settings.max_k)
        space = space or common_pb2.SPACE_VISUAL
        home = shard_for(image_id, self.shards)
        try:
            records, _ = await home.get([image_id], True, timeout)
        except Unavailable as exc:
            raise Unavailable(
                f"image {image_id!r} lives on shard {home.name}, which is unavailable: {exc.message}"
            ) from None
        if not records:
            raise NotFound(f"image {image_id!r} is not stored")
        record = records[0]
        head = self.heads.current().active if space == common_pb2.SPACE_SEMANTIC else ""
        vector = record.semantics.get(head) if space == common_pb2.SPACE_SEMANTIC else record.visual
        if vector is None:
            raise FailedPrecondition(f"image {image_id!r} has no stored vector in that space")
        exclude = [] if include_self else [image_id]
        return await self.fan_out("SearchById", space, vector, k, exclude, head, timeout)

    async def fan_out(
        self, method: str, space: int, query: Matrix, k: int, exclude: list[str], head: str, timeout: float
    ) -> SearchResult:
        """Search every shard concurrently; merge the top k; a failed shard makes the result partial."""

        async def one(shard: Shard) -> list[Hit]:
            start = time.perf_counter()
            try:
                return await shard.search(space, query, k, exclude, head, timeout)
            finally:
                metrics.FANOUT_SECONDS.labels(shard.name).observe(time.perf_counter() - start)

        answers = await asyncio.gather(*(one(s) for s in self.shards), return_exceptions=True)
        hits: list[Hit] = []
        failed: list[str] = []
        errors: list[ImgsearchError] = []
        for shard, answer in zip(self.shards, answers, strict=True):
            if isinstance(answer, BaseException):
                if not isinstance(answer, ImgsearchError):
                    raise answer
                if answer.code in _CALLER_ERRORS:
                    raise answer
                metrics.SHARD_ERRORS.labels(shard.name, _code(answer)).inc()
                log.warning("shard failed", extra={"shard": shard.name, "error": answer.message})
                failed.append(shard.name)
                errors.append(answer)
            else:
                hits.extend(answer)
        if len(failed) == len(self.shards):
            raise Unavailable("no index shard answered: " + "; ".join(e.message for e in errors))
        if failed:
            metrics.PARTIAL_RESULTS.labels(method).inc()
        top = heapq.nlargest(k, hits, key=lambda h: h.score)
        return SearchResult(top, space, head, failed, len(self.shards))

    # ---- tags -----------------------------------------------------------------------------------

    async def tag_image(self, data: bytes, k: int, tag_filter: int, timeout: float) -> RankedTags:
        self.check_image(data, "image")
        check_k(k, self.settings.max_tag_k)
        head = self.heads.active()
        (enc,) = await self.encoder.encode_images([(data, "image")], include_logits=True, timeout=timeout)
        if enc.error is not None or enc.features is None:
            raise enc.error or InvalidArgument("image could not be encoded")
        return await self.tagger.rank_tags(
            enc.features, enc.logits, k, tag_filter, head_id(head), self.vocabulary_version, timeout
        )

    def saw_vocabulary(self, version: int) -> None:
        self.vocabulary_version = max(self.vocabulary_version, version)

    # ---- heads ----------------------------------------------------------------------------------

    async def activate_head(self, spec: str) -> Activation:
        """Start a build-then-flip switch to a head installed in the heads directory; returns at once."""
        return await self.heads.activate(spec)
