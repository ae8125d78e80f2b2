"""Typed async clients for the tagger and the index shards, as the gateway uses them."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

import grpc
from grpc import aio
from prometheus_client import Histogram

from imgsearch.api.common.v1 import common_pb2
from imgsearch.api.index.v1 import index_pb2, index_pb2_grpc
from imgsearch.api.tagger.v1 import tagger_pb2, tagger_pb2_grpc
from imgsearch.gateway import metrics
from imgsearch.gateway.heads import HeadConfig, HeadShard, ShardHeads, StoredSignals
from imgsearch.gateway.search import Cursor
from imgsearch.kit.coalesce import Coalescer, Send
from imgsearch.kit.convert import Matrix, error_code, from_vector, has_values, packed
from imgsearch.kit.encoder_client import EncodedImage
from imgsearch.kit.errors import ImgsearchError
from imgsearch.kit.peers import PeerError
from imgsearch.models.manifest import ModelInfo


@dataclass(frozen=True)
class Hit:
    """One search result."""

    id: str
    score: float
    metadata: dict[str, str]
    source_name: str
    shard: str


@dataclass(frozen=True)
class ShardQuery:
    """What narrows one shard's search: metadata terms (AND of any-of), time range, min score, cursor."""

    filter: tuple[tuple[str, tuple[str, ...]], ...] = ()
    created_after_ms: int = 0
    created_before_ms: int = 0
    min_score: float | None = None
    # Only hits ranked strictly after this (score desc, id asc) position: the previous page's last hit.
    after: Cursor | None = None


@dataclass(frozen=True)
class NewRecord:
    """An image ready to store: both vectors and its metadata."""

    id: str
    visual: Matrix
    # One vector per head the configuration requires (two while a switch is being built).
    semantics: dict[str, Matrix]
    metadata: dict[str, str] = field(default_factory=dict)
    source_name: str = ""
    # Kept so a later head switch can re-project the image without its bytes.
    feature_norm: float = 0.0
    top_logits: list[tuple[int, float]] = field(default_factory=list)
    # A small JPEG for result pages (empty when thumbnails are off or the bytes could not be read).
    thumbnail: bytes = b""


@dataclass(frozen=True)
class StoredRecord:
    id: str
    metadata: dict[str, str]
    source_name: str
    created_ms: int
    shard: str
    visual: Matrix | None = None
    semantics: dict[str, Matrix] = field(default_factory=dict)
    thumbnail: bytes = b""


@dataclass(frozen=True)
class RankedTags:
    """A tagger's ranking of its vocabulary for one image."""

    tags: list[common_pb2.TagScore]
    head: str
    vocabulary_size: int
    vocabulary_version: int


class Shard(HeadShard, Protocol):
    """What the gateway core needs from an index shard: ShardClient, or an in-memory fake in unit tests."""

    async def search(
        self,
        space: int,
        query: Matrix,
        k: int,
        exclude: Sequence[str],
        head: str,
        timeout: float,
        options: ShardQuery | None = None,
    ) -> list[Hit]: ...

    async def upsert(self, records: Sequence[NewRecord], timeout: float) -> list[index_pb2.WriteResult]: ...

    async def delete(self, ids: Sequence[str], timeout: float) -> list[index_pb2.WriteResult]: ...

    async def count(self, timeout: float) -> int: ...

    async def get(
        self, ids: Sequence[str], include_vectors: bool, timeout: float, include_thumbnails: bool = False
    ) -> tuple[list[StoredRecord], list[str]]: ...


class Tagger(Protocol):
    """What the gateway core needs from the tagger (TaggerClient, or a fake)."""

    async def rank_tags(
        self,
        features: Matrix,
        logits: Matrix | None,
        top_k: int,
        tag_filter: int,
        head: str,
        min_version: int,
        timeout: float,
    ) -> RankedTags: ...

    async def add_tags(self, tags: Sequence[str], timeout: float) -> tagger_pb2.AddTagsResponse: ...

    async def remove_tags(self, tags: Sequence[str], timeout: float) -> tagger_pb2.RemoveTagsResponse: ...

    async def list_tags(
        self, tag_filter: int, page_size: int, page_token: str, min_version: int, timeout: float
    ) -> tagger_pb2.ListTagsResponse: ...


class Encoder(Protocol):
    """What the gateway core needs from the encoder (kit's EncoderClient, or a fake)."""

    async def model_info(self, timeout: float) -> ModelInfo: ...

    async def encode_texts(self, texts: Sequence[str], timeout: float) -> list[Matrix | ImgsearchError]: ...

    async def encode_images(
        self, images: Sequence[tuple[bytes, str]], include_logits: bool, timeout: float, thumbnail_px: int = 0
    ) -> list[EncodedImage]: ...


class TaggerClient:
    """TaggerService as the gateway calls it: ranking and listing on the read replicas, edits on the writer.

    The channels come from kit.peers.peer_channel, whose interceptor turns a failed call into the
    ImgsearchError our caller should see, so these methods just await the stubs.
    """

    def __init__(self, reads: aio.Channel, writes: aio.Channel) -> None:
        self.reads = tagger_pb2_grpc.TaggerServiceStub(reads)
        self.writes = tagger_pb2_grpc.TaggerServiceStub(writes)

    async def rank_tags(
        self,
        features: Matrix,
        logits: Matrix | None,
        top_k: int,
        tag_filter: int,
        head: str,
        min_version: int,
        timeout: float,
    ) -> RankedTags:
        req = tagger_pb2.RankTagsRequest(
            image=tagger_pb2.ImageSignal(
                # Repeated floats: the tagger checks signal sizes on `values` and does not take packed vectors yet.
                features=packed(features),
                logits=None if logits is None else packed(logits),
            ),
            top_k=top_k,
            filter=tag_filter,  # type: ignore[arg-type]
            head=head,
            min_vocabulary_version=min_version,
        )
        r = await self.reads.RankTags(req, timeout=timeout)
        return RankedTags(list(r.tags), r.head, r.vocabulary_size, r.vocabulary_version)

    async def add_tags(self, tags: Sequence[str], timeout: float) -> tagger_pb2.AddTagsResponse:
        return await self.writes.AddTags(tagger_pb2.AddTagsRequest(tags=list(tags)), timeout=timeout)

    async def remove_tags(self, tags: Sequence[str], timeout: float) -> tagger_pb2.RemoveTagsResponse:
        return await self.writes.RemoveTags(tagger_pb2.RemoveTagsRequest(tags=list(tags)), timeout=timeout)

    async def list_tags(
        self, tag_filter: int, page_size: int, page_token: str, min_version: int, timeout: float
    ) -> tagger_pb2.ListTagsResponse:
        req = tagger_pb2.ListTagsRequest(
            filter=tag_filter,  # type: ignore[arg-type]
            page_size=page_size,
            page_token=page_token,
            min_vocabulary_version=min_version,
        )
        return await self.reads.ListTags(req, timeout=timeout)


def _shard_heads(name: str, r: index_pb2.GetHeadStateResponse | index_pb2.SetHeadConfigResponse) -> ShardHeads:
    return ShardHeads(
        shard=name,
        config=HeadConfig(r.config.epoch, r.config.active, r.config.building),
        records=r.records,
        vectors=dict(r.vectors_per_head),
        last_write_ms=r.last_semantic_write_unix_ms,
    )


def _semantics(r: index_pb2.Record) -> dict[str, Matrix]:
    out = {s.head: from_vector(s.vector) for s in r.semantics if has_values(s.vector)}
    if r.semantic_head and has_values(r.semantic) and r.semantic_head not in out:
        out[r.semantic_head] = from_vector(r.semantic)
    return out


T = TypeVar("T")
R = TypeVar("R")


@dataclass(frozen=True)
class Coalescing:
    """How a ShardClient batches concurrent calls (see kit.coalesce); max_batch 1 turns it off."""

    max_batch: int = 64
    max_inflight: int = 1

    def make(self, send: Send[T, R], peer: str, batch_sizes: Histogram) -> Coalescer[T, R]:
        return Coalescer(
            send, peer=peer, max_batch=self.max_batch, max_inflight=self.max_inflight, observe=batch_sizes.observe
        )


def _search_request(
    space: int, query: Matrix, k: int, exclude: Sequence[str], head: str, options: ShardQuery | None
) -> index_pb2.SearchRequest:
    req = index_pb2.SearchRequest(
        space=space,  # type: ignore[arg-type]
        query=packed(query),
        k=k,
        exclude_ids=list(exclude),
        semantic_head=head,
    )
    if options is not None:
        if options.filter or options.created_after_ms or options.created_before_ms:
            req.filter.CopyFrom(
                index_pb2.MetadataFilter(
                    terms=[index_pb2.FilterTerm(key=key, values=list(v)) for key, v in options.filter],
                    created_after_unix_ms=options.created_after_ms,
                    created_before_unix_ms=options.created_before_ms,
                )
            )
        if options.min_score is not None:
            req.min_score = options.min_score
        if options.after is not None:
            req.after.CopyFrom(index_pb2.SearchCursor(score=options.after.score, id=options.after.id))
    return req


class ShardClient:
    """One index shard.

    Concurrent searches, and single-id Gets (search by id), are coalesced into batched calls while the shard is
    busy (kit.coalesce): under load the shard and this process pay one call's overhead per batch, not per query.
    """

    def __init__(
        self, name: str, address: str, channel: aio.Channel, coalescing: Coalescing | None = Coalescing()
    ) -> None:
        self.name = name
        self.address = address
        self.channel = channel
        self.stub = index_pb2_grpc.IndexServiceStub(channel)
        self.peer = f"index shard {name}"
        # Cleared when the shard answers UNIMPLEMENTED (an older shard during a rolling upgrade).
        self.batch_supported = True
        self._searches: Coalescer[index_pb2.SearchRequest, index_pb2.SearchResponse] | None = None
        self._gets: Coalescer[str, index_pb2.Record | None] | None = None
        if coalescing is not None and coalescing.max_batch > 1:
            self._searches = coalescing.make(
                self._send_searches, self.peer, metrics.SHARD_BATCH_SIZE.labels(name, "Search")
            )
            self._gets = coalescing.make(self._send_gets, self.peer, metrics.SHARD_BATCH_SIZE.labels(name, "Get"))

    async def search(
        self,
        space: int,
        query: Matrix,
        k: int,
        exclude: Sequence[str],
        head: str,
        timeout: float,
        options: ShardQuery | None = None,
    ) -> list[Hit]:
        req = _search_request(space, query, k, exclude, head, options)
        if self._searches is None:
            r = await self.stub.Search(req, timeout=timeout)
        else:
            r = await self._searches.call(req, timeout)
        return [Hit(h.id, h.score, dict(h.metadata), h.source_name, h.shard or self.name) for h in r.hits]

    async def _send_searches(
        self, reqs: list[index_pb2.SearchRequest], timeout: float
    ) -> list[index_pb2.SearchResponse | ImgsearchError]:
        if len(reqs) > 1 and self.batch_supported:
            try:
                resp = await self.stub.SearchBatch(index_pb2.SearchBatchRequest(searches=reqs), timeout=timeout)
            except PeerError as exc:
                if exc.code != grpc.StatusCode.UNIMPLEMENTED:
                    raise
                self.batch_supported = False
            else:
                return [
                    PeerError(error_code(r.error), f"{self.peer}: {r.error.message}")
                    if r.HasField("error")
                    else r.response
                    for r in resp.results
                ]

        async def one(req: index_pb2.SearchRequest) -> index_pb2.SearchResponse | ImgsearchError:
            try:
                return await self.stub.Search(req, timeout=timeout)
            except ImgsearchError as exc:
                return exc

        return list(await asyncio.gather(*(one(r) for r in reqs)))

    async def _send_gets(self, ids: list[str], timeout: float) -> list[index_pb2.Record | None]:
        """One Get (with vectors) for the single-id Gets of concurrent callers; None for an id not stored."""
        unique = list(dict.fromkeys(ids))
        resp = await self.stub.Get(index_pb2.GetRequest(ids=unique, include_vectors=True), timeout=timeout)
        found = {r.id: r for r in resp.records}
        return [found.get(i) for i in ids]

    async def upsert(self, records: Sequence[NewRecord], timeout: float) -> list[index_pb2.WriteResult]:
        req = index_pb2.UpsertRequest(
            records=[
                index_pb2.Record(
                    id=r.id,
                    visual=packed(r.visual),
                    semantics=[
                        index_pb2.SemanticVector(head=head, vector=packed(vector))
                        for head, vector in r.semantics.items()
                    ],
                    metadata=r.metadata,
                    source_name=r.source_name,
                    feature_norm=r.feature_norm,
                    top_logits=[index_pb2.ClassLogit(class_index=c, logit=v) for c, v in r.top_logits],
                    thumbnail=r.thumbnail,
                )
                for r in records
            ]
        )
        resp = await self.stub.Upsert(req, timeout=timeout)
        return list(resp.results)

    async def delete(self, ids: Sequence[str], timeout: float) -> list[index_pb2.WriteResult]:
        resp = await self.stub.Delete(index_pb2.DeleteRequest(ids=list(ids)), timeout=timeout)
        return list(resp.results)

    async def get(
        self, ids: Sequence[str], include_vectors: bool, timeout: float, include_thumbnails: bool = False
    ) -> tuple[list[StoredRecord], list[str]]:
        if self._gets is not None and len(ids) == 1 and include_vectors and not include_thumbnails:
            record = await self._gets.call(ids[0], timeout)
            found, missing = ([record], []) if record is not None else ([], list(ids))
        else:
            resp = await self.stub.Get(
                index_pb2.GetRequest(
                    ids=list(ids), include_vectors=include_vectors, include_thumbnails=include_thumbnails
                ),
                timeout=timeout,
            )
            found, missing = list(resp.records), list(resp.missing_ids)
        records = [
            StoredRecord(
                id=r.id,
                metadata=dict(r.metadata),
                source_name=r.source_name,
                created_ms=r.created_unix_ms,
                shard=self.name,
                visual=from_vector(r.visual) if include_vectors and has_values(r.visual) else None,
                semantics=_semantics(r) if include_vectors else {},
                thumbnail=r.thumbnail,
            )
            for r in found
        ]
        return records, missing

    async def count(self, timeout: float) -> int:
        """Images stored on this shard."""
        return int((await self.stub.Stats(index_pb2.StatsRequest(), timeout=timeout)).count)

    # ---- head management (HeadShard) -----------------------------------------------------------------

    async def head_state(self, timeout: float) -> ShardHeads:
        return _shard_heads(self.name, await self.stub.GetHeadState(index_pb2.GetHeadStateRequest(), timeout=timeout))

    async def set_head_config(self, config: HeadConfig, timeout: float) -> ShardHeads:
        req = index_pb2.SetHeadConfigRequest(
            config=index_pb2.HeadConfig(epoch=config.epoch, active=config.active, building=config.building)
        )
        return _shard_heads(self.name, await self.stub.SetHeadConfig(req, timeout=timeout))

    async def scan_missing(
        self, head: str, page_size: int, page_token: str, timeout: float
    ) -> tuple[list[StoredSignals], str]:
        req = index_pb2.ScanRequest(page_size=page_size, page_token=page_token, skip_semantic_head=head)
        resp = await self.stub.Scan(req, timeout=timeout)
        records = [
            StoredSignals(
                r.id,
                from_vector(r.visual),
                r.feature_norm,
                [(c.class_index, c.logit) for c in r.top_logits],
            )
            for r in resp.records
            if has_values(r.visual)
        ]
        return records, resp.next_page_token

    async def set_semantic(self, head: str, updates: Sequence[tuple[str, Matrix]], timeout: float) -> int:
        req = index_pb2.SetSemanticRequest(
            updates=[index_pb2.SemanticUpdate(id=i, semantic=packed(v), semantic_head=head) for i, v in updates]
        )
        resp = await self.stub.SetSemantic(req, timeout=timeout)
        return sum(1 for w in resp.results if not w.HasField("error"))


S = TypeVar("S", bound=HeadShard)


def shard_for(image_id: str, shards: Sequence[S]) -> S:
    """Rendezvous (highest-random-weight) hashing: stable per id, and adding a shard moves only ~1/n ids."""

    def weight(shard: S) -> bytes:
        return hashlib.sha256(f"{shard.name}\x00{image_id}".encode()).digest()

    return max(shards, key=weight)


class CoalescingEncoder:
    """The encoder with single-text embeddings (a SearchByText each) coalesced into one EncodeTexts while the
    encoder is busy (kit.coalesce); everything else goes straight through."""

    def __init__(self, encoder: Encoder, coalescing: Coalescing) -> None:
        self.encoder = encoder
        self._texts: Coalescer[str, Matrix] | None = None
        if coalescing.max_batch > 1:
            self._texts = coalescing.make(
                encoder.encode_texts, "the encoder", metrics.ENCODER_BATCH_SIZE.labels("EncodeTexts")
            )

    async def model_info(self, timeout: float) -> ModelInfo:
        return await self.encoder.model_info(timeout)

    async def encode_texts(self, texts: Sequence[str], timeout: float) -> list[Matrix | ImgsearchError]:
        if self._texts is None or len(texts) != 1:
            return await self.encoder.encode_texts(texts, timeout)
        try:
            return [await self._texts.call(texts[0], timeout)]
        except ImgsearchError as exc:
            # One text's own error is its item error, as the encoder would have answered it alone.
            return [exc]

    async def encode_images(
        self, images: Sequence[tuple[bytes, str]], include_logits: bool, timeout: float, thumbnail_px: int = 0
    ) -> list[EncodedImage]:
        return await self.encoder.encode_images(images, include_logits, timeout, thumbnail_px)
