"""Gateway core: validation, routing writes by id, concurrent fan-out of searches and top-k merging."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
import unicodedata
from collections import defaultdict
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field

import grpc
import numpy as np

from imgsearch.api.common.v1 import common_pb2
from imgsearch.gateway import metrics
from imgsearch.gateway.heads import Activation, HeadManager, HeadShard, project_images
from imgsearch.gateway.peers import (
    Encoder,
    Hit,
    NewRecord,
    RankedTags,
    Shard,
    ShardQuery,
    StoredRecord,
    Tagger,
    shard_for,
)
from imgsearch.gateway.search import (
    ROCCHIO,
    Cursor,
    Rocchio,
    SearchOptions,
    check_options,
    decode_token,
    default_k,
    digest,
    encode_token,
    rank_key,
    rocchio,
)
from imgsearch.gateway.settings import GatewaySettings
from imgsearch.gateway.thumbnails import make_thumbnail
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

NO_OPTIONS = SearchOptions()

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
class _PreparedBatch:
    """A batch of the add pipeline between encoding and storing."""

    batch: list[tuple[int, NewImage]]
    results: dict[int, AddResult] = field(default_factory=dict)
    good: list[tuple[int, NewImage, str, Matrix, Matrix | None]] = field(default_factory=list)
    # Small JPEGs by stream position (thumbnails on): the encoder's, else made here (see _prepare_batch).
    thumbnails: dict[int, bytes] = field(default_factory=dict)


@dataclass
class SearchResult:
    hits: list[Hit]
    space: int
    head: str = ""
    failed_shards: list[str] = field(default_factory=list)
    shards_total: int = 0
    # For the page after this one (same query and options); empty when fewer than k hits came back.
    next_page_token: str = ""

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
        # Whether _thumbnails has run: said once in the log, as it costs CPU the encoder should have saved.
        self._made_thumbnails = False

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
        """Encode, project and store streamed images in batches; each image succeeds or fails alone.

        The same pipeline as add_images_stream; the results are returned together, in stream order.
        """
        results = [r async for done in self.add_images_stream(stream, timeout) for r in done]
        return sorted(results, key=lambda r: r.position)

    async def add_images_stream(
        self, stream: AsyncIterator[NewImage], timeout: Callable[[], float]
    ) -> AsyncGenerator[list[AddResult], None]:
        """Yield the results of each batch of streamed images as soon as it is stored (or has failed).

        A bounded pipeline overlaps the stages: while one batch is written to the shards, the next ones are
        decoded and encoded and more images are received, at most ADD_PIPELINE_DEPTH batches (of at most
        ADD_BATCH_MAX_BYTES of image data each) at a time, so a fast sender is slowed by gRPC flow control rather
        than buffered. Batches are written to the shards in stream order, so a later image with the same id
        still replaces an earlier one. A failure of a whole call (the encoder unreachable) fails the stream.
        """
        # aclosing: when our caller stops early (or is cancelled), the pipeline stops its tasks now, not at GC.
        async with contextlib.aclosing(_AddPipeline(self, timeout).run(stream)) as batches:
            async for done in batches:
                for r in done:
                    metrics.IMAGES_ADDED.labels("error" if r.error else "ok").inc()
                yield done

    async def _prepare_batch(self, batch: list[tuple[int, NewImage]], timeout: float) -> _PreparedBatch:
        """Validate and encode one batch (the pipeline's parallel stage); nothing is stored yet."""
        prepared = _PreparedBatch(batch)
        results = prepared.results
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
            # The encoder makes the thumbnails from the decode it does anyway: a second decode here cost the
            # gateway about 6.7 ms of CPU per 12 MP photo, a third of the encoder's own time for it.
            thumbnail_px = self.settings.thumbnail_px if self.settings.thumbnails else 0
            encoded = await self.encoder.encode_images(
                [(image.data, image.source_name or image_id) for _, image, image_id in valid],
                include_logits=True,
                timeout=timeout,
                thumbnail_px=thumbnail_px,
            )
            missing: list[tuple[int, NewImage]] = []
            for (pos, image, image_id), enc in zip(valid, encoded, strict=True):
                if enc.error is not None or enc.features is None:
                    results[pos].error = enc.error or InvalidArgument(f"image {pos} could not be encoded")
                    continue
                prepared.good.append((pos, image, image_id, enc.features, enc.logits))
                if thumbnail_px and enc.thumbnail:
                    prepared.thumbnails[pos] = enc.thumbnail
                elif thumbnail_px:
                    missing.append((pos, image))
            if missing:
                # An encoder older than EncodeImagesRequest.thumbnail_px (a rolling upgrade) ignores it.
                prepared.thumbnails.update(await asyncio.to_thread(self._thumbnails, missing))
        return prepared

    def _thumbnails(self, images: list[tuple[int, NewImage]]) -> dict[int, bytes]:
        size = self.settings.thumbnail_px
        if not self._made_thumbnails:
            self._made_thumbnails = True
            log.info("the encoder returned no thumbnails; making them in the gateway (an older encoder?)")
        return {pos: make_thumbnail(image.data, size) for pos, image in images}

    async def _store_prepared(self, prepared: _PreparedBatch, timeout: float) -> list[AddResult]:
        """Project and write an encoded batch (the pipeline's ordered stage); its results in batch order."""
        if prepared.good:
            await self._store(prepared.good, prepared.results, timeout, prepared.thumbnails)
        return [prepared.results[pos] for pos, _ in prepared.batch]

    async def _store(
        self,
        good: list[tuple[int, NewImage, str, Matrix, Matrix | None]],
        results: dict[int, AddResult],
        timeout: float,
        thumbnails: dict[int, bytes] | None = None,
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
            stale = await self._write_records(
                good, pending, visual, norms, logits, semantics, results, timeout, thumbnails or {}
            )
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
        thumbnails: dict[int, bytes],
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
                thumbnail=thumbnails.get(good[row][0], b""),
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

    async def get_images(
        self, ids: Sequence[str], timeout: float, include_vectors: bool = False, include_thumbnails: bool = False
    ) -> tuple[list[StoredRecord], list[str], bool]:
        self.check_ids(ids)
        found: dict[str, StoredRecord] = {}
        missing: list[str] = []
        partial = False

        async def run(shard: Shard, items: list[tuple[int, str]]) -> None:
            nonlocal partial
            try:
                records, miss = await shard.get(
                    [image_id for _, image_id in items], include_vectors, timeout, include_thumbnails
                )
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

    async def count_images(self, timeout: float) -> tuple[dict[str, int], list[str]]:
        """Images per shard that answered, and the shards that did not."""
        answers = await asyncio.gather(*(s.count(timeout) for s in self.shards), return_exceptions=True)
        counts: dict[str, int] = {}
        failed: list[str] = []
        for shard, answer in zip(self.shards, answers, strict=True):
            if isinstance(answer, ImgsearchError):
                metrics.SHARD_ERRORS.labels(shard.name, _code(answer)).inc()
                failed.append(shard.name)
            elif isinstance(answer, BaseException):
                raise answer
            else:
                counts[shard.name] = answer
        if not counts:
            raise Unavailable("no index shard answered")
        return counts, failed

    async def search_by_image(
        self, data: bytes, k: int, space: int, timeout: float, options: SearchOptions = NO_OPTIONS
    ) -> SearchResult:
        self.check_image(data, "query image")
        k = check_k(default_k(k), self.settings.max_k)
        check_options(options)
        space = space or common_pb2.SPACE_VISUAL
        semantic = space == common_pb2.SPACE_SEMANTIC
        (enc,) = await self.encoder.encode_images([(data, "query image")], include_logits=semantic, timeout=timeout)
        if enc.error is not None or enc.features is None:
            raise enc.error or InvalidArgument("query image could not be encoded")
        query_key = digest("image", hashlib.sha256(data).digest())
        if semantic:
            head = self.heads.active()
            vectors = await asyncio.to_thread(
                project_images,
                self.heads.catalog,
                head,
                enc.features[None, :],
                None if enc.logits is None else enc.logits[None, :],
            )
            query = head.search_queries(vectors)[0]
            return await self.fan_out("SearchByImage", space, query, k, [], head_id(head), timeout, options, query_key)
        query = enc.features / max(float(np.linalg.norm(enc.features)), 1e-12)
        return await self.fan_out("SearchByImage", space, query, k, [], "", timeout, options, query_key)

    def _clean_query(self, query: str, what: str = "query") -> str:
        text = " ".join(query.split())
        if not text:
            raise InvalidArgument(f"{what} is empty: give a few words describing the images to find")
        if len(text) > self.settings.max_query_chars:
            raise InvalidArgument(
                f"{what} is {len(text)} characters long, the limit is {self.settings.max_query_chars}"
            )
        return text

    async def search_by_text(
        self, query: str, k: int, timeout: float, options: SearchOptions = NO_OPTIONS
    ) -> SearchResult:
        text = self._clean_query(query)
        k = check_k(default_k(k), self.settings.max_k)
        check_options(options)
        (emb,) = await self.encoder.encode_texts([text], timeout)
        if isinstance(emb, ImgsearchError):
            raise emb
        return await self._text_fan_out(text, emb, k, timeout, options)

    async def _text_fan_out(
        self, text: str, embedding: Matrix, k: int, timeout: float, options: SearchOptions
    ) -> SearchResult:
        head = self.heads.active()
        vector = head.search_queries(head.project_texts(embedding[None, :]))[0]
        return await self.fan_out(
            "SearchByText",
            common_pb2.SPACE_SEMANTIC,
            vector,
            k,
            [],
            head_id(head),
            timeout,
            options,
            digest("text", text),
        )

    async def search_by_texts(
        self, queries: Sequence[str], k: int, timeout: float, options: SearchOptions = NO_OPTIONS
    ) -> list[SearchResult | ImgsearchError]:
        """Several text queries: one encoder call, concurrent fan-outs; each query succeeds or fails alone."""
        if not queries:
            raise InvalidArgument("no queries given")
        if len(queries) > self.settings.max_queries_per_request:
            raise ResourceExhausted(
                f"{len(queries)} queries in one request; the limit is {self.settings.max_queries_per_request}"
            )
        if options.page_token:
            raise InvalidArgument("page_token is not allowed with several queries: page one query at a time")
        k = check_k(default_k(k), self.settings.max_k)
        check_options(options)
        out: list[SearchResult | ImgsearchError] = []
        texts: list[tuple[int, str]] = []
        for i, query in enumerate(queries):
            try:
                texts.append((i, self._clean_query(query, f"query {i}")))
                out.append(InvalidArgument("not searched"))
            except ImgsearchError as exc:
                out.append(exc)
        if texts:
            embeddings = await self.encoder.encode_texts([t for _, t in texts], timeout)

            async def one(i: int, text: str, emb: Matrix | ImgsearchError) -> None:
                if isinstance(emb, ImgsearchError):
                    out[i] = emb
                    return
                try:
                    out[i] = await self._text_fan_out(text, emb, k, timeout, options)
                except ImgsearchError as exc:
                    out[i] = exc

            await asyncio.gather(*(one(i, t, e) for (i, t), e in zip(texts, embeddings, strict=True)))
        return out

    async def search_by_id(
        self,
        image_id: str,
        k: int,
        space: int,
        include_self: bool,
        timeout: float,
        options: SearchOptions = NO_OPTIONS,
    ) -> SearchResult:
        self.check_id(image_id)
        k = check_k(default_k(k), self.settings.max_k)
        check_options(options)
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
        if head:
            vector = self.heads.catalog.get(head).search_queries(vector[None, :])[0]
        exclude = [] if include_self else [image_id]
        return await self.fan_out(
            "SearchById", space, vector, k, exclude, head, timeout, options, digest("id", image_id, str(include_self))
        )

    async def search_by_examples(
        self,
        positive_ids: Sequence[str],
        negative_ids: Sequence[str],
        text: str,
        k: int,
        space: int,
        timeout: float,
        options: SearchOptions = NO_OPTIONS,
        weights: Rocchio = ROCCHIO,
    ) -> SearchResult:
        """Relevance feedback (Rocchio 1971): move the query towards liked images and away from disliked ones.

        q = a * text + b * mean(positives) - c * mean(negatives), normalised; with text the semantic space of
        the active head is searched, else the space asked for. The examples are left out of the hits.
        """
        text = " ".join(text.split())
        if not positive_ids and not text:
            raise InvalidArgument("give at least one positive example id or some text to search with")
        ids = [*positive_ids, *negative_ids]
        if len(ids) > self.settings.max_ids_per_request:
            raise ResourceExhausted(
                f"{len(ids)} example ids in one request; the limit is {self.settings.max_ids_per_request}"
            )
        for i, image_id in enumerate(ids):
            self.check_id(image_id, f"example id {i}")
        if len(text) > self.settings.max_query_chars:
            raise InvalidArgument(f"text is {len(text)} characters long, the limit is {self.settings.max_query_chars}")
        k = check_k(default_k(k), self.settings.max_k)
        check_options(options)
        weights.check()
        space = space or (common_pb2.SPACE_SEMANTIC if text else common_pb2.SPACE_VISUAL)
        if text and space != common_pb2.SPACE_SEMANTIC:
            raise InvalidArgument("text can only be combined with examples in the semantic space")
        semantic = space == common_pb2.SPACE_SEMANTIC
        head = self.heads.current().active if semantic else ""
        vectors: dict[str, Matrix] = {}
        if ids:
            records, missing, partial = await self.get_images(ids, timeout, include_vectors=True)
            if missing or partial:
                absent = sorted(set(ids) - {r.id for r in records})
                raise NotFound(f"example images not stored (or on an unavailable shard): {', '.join(absent)}")
            for r in records:
                v = r.semantics.get(head) if semantic else r.visual
                if v is None:
                    raise FailedPrecondition(f"image {r.id!r} has no stored vector in that space")
                vectors[r.id] = v
        text_vector = None
        if text:
            (emb,) = await self.encoder.encode_texts([text], timeout)
            if isinstance(emb, ImgsearchError):
                raise emb
            text_vector = self.heads.catalog.get(head).project_texts(emb[None, :])[0]
        query = rocchio(
            text_vector,
            [vectors[i] for i in positive_ids],
            [vectors[i] for i in negative_ids],
            weights,
        )
        if semantic:
            query = self.heads.catalog.get(head).search_queries(query[None, :])[0]
        key = digest("examples", text, ",".join(positive_ids), "|", ",".join(negative_ids), weights.key())
        return await self.fan_out(
            "SearchByExamples", space, query, k, list(dict.fromkeys(ids)), head, timeout, options, key
        )

    def shard_timeout(self, timeout: float) -> float:
        """Each shard's share of the caller's deadline: a slow or hung shard is cut off in time for the
        others' answer to reach the caller, marked partial and naming it."""
        s = self.settings
        return max(0.001, min(timeout * s.shard_deadline_fraction, s.shard_search_timeout_seconds))

    async def fan_out(
        self,
        method: str,
        space: int,
        query: Matrix,
        k: int,
        exclude: list[str],
        head: str,
        timeout: float,
        options: SearchOptions = NO_OPTIONS,
        query_key: str = "",
    ) -> SearchResult:
        """Search every shard concurrently; merge the top k; a failed shard makes the result partial."""
        token_digest = digest(method, str(space), head, query_key, options.key())
        after = decode_token(options.page_token, token_digest)
        shard_query = ShardQuery(
            filter=options.filter,
            created_after_ms=options.created_after_ms,
            created_before_ms=options.created_before_ms,
            min_score=options.min_score,
            after=after,
        )
        budget = self.shard_timeout(timeout)

        async def one(shard: Shard) -> list[Hit]:
            start = time.perf_counter()
            try:
                return await shard.search(space, query, k, exclude, head, budget, shard_query)
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
        top = sorted(hits, key=lambda h: rank_key(h.score, h.id))[:k]
        token = encode_token(Cursor(top[-1].score, top[-1].id), token_digest) if len(top) == k else ""
        return SearchResult(top, space, head, failed, len(self.shards), token)

    # ---- tags -----------------------------------------------------------------------------------

    async def tag_image(self, data: bytes, k: int, tag_filter: int, timeout: float) -> RankedTags:
        self.check_image(data, "image")
        k = check_k(default_k(k), self.settings.max_tag_k)
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


# ---- the add pipeline -------------------------------------------------------------------------------

# Batches between receiving and storing at once: one being received and two at the encoder (one decoding
# while the other runs the model: the encoder decodes a whole call before its inference) or being written.
# With batches of add_batch_size 64 this measured faster than 2 or 4 (docs/benchmarks.md); at most 128 of a
# stream's images then wait in the encoder's queue, which every stream into that encoder shares.
ADD_PIPELINE_DEPTH = 3
# A batch is closed early when its images reach this many bytes: camera photos are several MiB each, and
# their decoding, not a call's overhead, is their cost. Small batches of them start the pipeline sooner
# (12 MP photos ingested 10 % faster than with 42 MiB batches) and bound the image data one call holds: the
# depth's batches plus what waits to be batched, about 4 x 16 MiB.
ADD_BATCH_MAX_BYTES = 16 * 1024 * 1024
# A partial batch goes to the encoder when the sender pauses this long, so a slow sender still sees
# progress instead of waiting for a batch to fill.
ADD_LINGER_S = 0.025

_END = object()


class _AddPipeline:
    """One AddImages call: receive -> batch -> (validate, encode, project) -> store in order -> results."""

    def __init__(self, gateway: Gateway, timeout: Callable[[], float]) -> None:
        self.gw = gateway
        self.timeout = timeout
        self.batch_size = gateway.settings.add_batch_size
        self.batch_bytes = ADD_BATCH_MAX_BYTES
        self.slots = asyncio.Semaphore(ADD_PIPELINE_DEPTH)
        # Image bytes received and not yet in a batch, and a signal each time the batcher takes an image.
        self.inbox_bytes = 0
        self.inbox_taken = asyncio.Event()
        # Finished batches' results, or an exception that ends the call, or _END.
        self.out: asyncio.Queue[list[AddResult] | BaseException | object] = asyncio.Queue()
        self.tasks: set[asyncio.Task[None]] = set()
        self.received = 0

    async def run(self, stream: AsyncIterator[NewImage]) -> AsyncGenerator[list[AddResult], None]:
        feeder = asyncio.create_task(self._feed(stream))
        try:
            while True:
                item = await self.out.get()
                if item is _END:
                    break
                if isinstance(item, BaseException):
                    raise item
                yield item  # type: ignore[misc]
            await feeder
        finally:
            pending = [t for t in (feeder, *self.tasks) if not t.done()]
            for t in pending:
                t.cancel()
            if pending:
                await asyncio.gather(*pending, return_exceptions=True)

    async def _feed(self, stream: AsyncIterator[NewImage]) -> None:
        """Receive images, cut them into batches and start each batch's task; then wait for all of them."""
        # Received images not yet in a batch: at most about one batch's worth (see _receive), plus the end marker.
        inbox: asyncio.Queue[NewImage | object] = asyncio.Queue()
        receiver = asyncio.create_task(self._receive(stream, inbox))
        previous: asyncio.Task[None] | None = None
        try:
            ended = False
            while not ended:
                batch: list[tuple[int, NewImage]] = []
                size = 0
                await self.slots.acquire()
                try:
                    while len(batch) < self.batch_size and size < self.batch_bytes:
                        if not batch:
                            item = await inbox.get()
                        elif not inbox.empty():
                            # Already received: no timer needed (wait_for costs a task per image).
                            item = inbox.get_nowait()
                        else:
                            try:
                                item = await asyncio.wait_for(inbox.get(), ADD_LINGER_S)
                            except TimeoutError:
                                break
                        if item is _END:
                            ended = True
                            break
                        assert isinstance(item, NewImage)
                        self.inbox_bytes -= len(item.data)
                        self.inbox_taken.set()
                        batch.append((self.received, item))
                        self.received += 1
                        size += len(item.data)
                except BaseException:
                    self.slots.release()
                    raise
                if not batch:
                    self.slots.release()
                    continue
                previous = asyncio.create_task(self._batch(batch, previous))
                self.tasks.add(previous)
                previous.add_done_callback(self.tasks.discard)
            await receiver  # re-raises a broken request stream
            if self.received == 0:
                raise InvalidArgument("the stream contained no images")
            if previous is not None:
                await previous  # batches finish in order: the last one done means all are
            self.out.put_nowait(_END)
        except BaseException as exc:
            if not isinstance(exc, asyncio.CancelledError):
                self.out.put_nowait(exc)
            raise
        finally:
            if not receiver.done():
                receiver.cancel()
            # Wait for it (its error, if any, was raised above or no longer matters).
            await asyncio.gather(receiver, return_exceptions=True)

    async def _receive(self, stream: AsyncIterator[NewImage], inbox: asyncio.Queue[NewImage | object]) -> None:
        try:
            async for image in stream:
                inbox.put_nowait(image)
                self.inbox_bytes += len(image.data)
                # Stop reading (gRPC flow control then slows the sender) while a batch's worth is waiting, in
                # images (more than a batch, counting this one) or in bytes.
                while inbox.qsize() > self.batch_size or self.inbox_bytes >= self.batch_bytes:
                    self.inbox_taken.clear()
                    await self.inbox_taken.wait()
        finally:
            # Also on error: the batcher must not wait for more; the error comes from awaiting this task.
            inbox.put_nowait(_END)

    async def _batch(self, batch: list[tuple[int, NewImage]], previous: asyncio.Task[None] | None) -> None:
        try:
            try:
                prepared = await self.gw._prepare_batch(batch, self.timeout())
            finally:
                # Store in stream order: a batch waits for the one before it (whose failure ends the call).
                if previous is not None:
                    await asyncio.shield(previous)
            results = await self.gw._store_prepared(prepared, self.timeout())
            self.out.put_nowait(results)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            self.out.put_nowait(exc)
            raise
        finally:
            self.slots.release()
