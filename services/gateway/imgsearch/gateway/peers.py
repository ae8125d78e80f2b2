"""Typed async clients for the tagger and the index shards, as the gateway uses them."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field

import grpc
from grpc import aio

from imgsearch.api.index.v1 import index_pb2, index_pb2_grpc
from imgsearch.api.tagger.v1 import tagger_pb2, tagger_pb2_grpc
from imgsearch.kit.convert import Matrix, from_vector, stack, to_vector
from imgsearch.kit.peers import peer_error


@dataclass(frozen=True)
class Hit:
    """One search result."""

    id: str
    score: float
    metadata: dict[str, str]
    source_name: str
    shard: str


@dataclass(frozen=True)
class NewRecord:
    """An image ready to store: both vectors and its metadata."""

    id: str
    visual: Matrix
    semantic: Matrix
    semantic_head: str
    metadata: dict[str, str] = field(default_factory=dict)
    source_name: str = ""
    # Kept so a later head switch can re-project the image without its bytes.
    feature_norm: float = 0.0
    top_logits: list[tuple[int, float]] = field(default_factory=list)


@dataclass(frozen=True)
class StoredRecord:
    id: str
    metadata: dict[str, str]
    source_name: str
    created_ms: int
    shard: str
    visual: Matrix | None = None
    semantic: Matrix | None = None
    semantic_head: str = ""


class TaggerClient:
    """TaggerService as the gateway calls it."""

    def __init__(self, channel: aio.Channel, address: str) -> None:
        self.stub = tagger_pb2_grpc.TaggerServiceStub(channel)
        self.peer = f"tagger at {address}"

    async def project_images(self, features: Matrix, logits: Matrix | None, timeout: float) -> tuple[Matrix, str]:
        req = tagger_pb2.ProjectImagesRequest(
            images=[
                tagger_pb2.ImageSignal(
                    features=to_vector(features[i]), logits=None if logits is None else to_vector(logits[i])
                )
                for i in range(features.shape[0])
            ]
        )
        try:
            r = await self.stub.ProjectImages(req, timeout=timeout)
        except grpc.RpcError as exc:
            raise peer_error(exc, self.peer) from None
        dim = len(r.vectors[0].values) if r.vectors else 0
        return stack(r.vectors, dim, "projected vector"), r.head

    async def project_texts(self, embeddings: Matrix, timeout: float) -> tuple[Matrix, str]:
        req = tagger_pb2.ProjectTextsRequest(embeddings=[to_vector(e) for e in embeddings])
        try:
            r = await self.stub.ProjectTexts(req, timeout=timeout)
        except grpc.RpcError as exc:
            raise peer_error(exc, self.peer) from None
        dim = len(r.vectors[0].values) if r.vectors else 0
        return stack(r.vectors, dim, "projected vector"), r.head

    async def rank_tags(
        self, features: Matrix, logits: Matrix | None, top_k: int, tag_filter: int, timeout: float
    ) -> tagger_pb2.RankTagsResponse:
        req = tagger_pb2.RankTagsRequest(
            image=tagger_pb2.ImageSignal(
                features=to_vector(features), logits=None if logits is None else to_vector(logits)
            ),
            top_k=top_k,
            filter=tag_filter,  # type: ignore[arg-type]
        )
        try:
            return await self.stub.RankTags(req, timeout=timeout)
        except grpc.RpcError as exc:
            raise peer_error(exc, self.peer) from None

    async def list_heads(self, timeout: float) -> tagger_pb2.ListHeadsResponse:
        try:
            return await self.stub.ListHeads(tagger_pb2.ListHeadsRequest(), timeout=timeout)
        except grpc.RpcError as exc:
            raise peer_error(exc, self.peer) from None

    async def activate_head(self, head: str, timeout: float) -> tagger_pb2.ActivateHeadResponse:
        try:
            return await self.stub.ActivateHead(tagger_pb2.ActivateHeadRequest(head=head), timeout=timeout)
        except grpc.RpcError as exc:
            raise peer_error(exc, self.peer) from None

    async def add_tags(self, tags: Sequence[str], timeout: float) -> tagger_pb2.AddTagsResponse:
        try:
            return await self.stub.AddTags(tagger_pb2.AddTagsRequest(tags=list(tags)), timeout=timeout)
        except grpc.RpcError as exc:
            raise peer_error(exc, self.peer) from None

    async def remove_tags(self, tags: Sequence[str], timeout: float) -> tagger_pb2.RemoveTagsResponse:
        try:
            return await self.stub.RemoveTags(tagger_pb2.RemoveTagsRequest(tags=list(tags)), timeout=timeout)
        except grpc.RpcError as exc:
            raise peer_error(exc, self.peer) from None

    async def list_tags(
        self, tag_filter: int, page_size: int, page_token: str, timeout: float
    ) -> tagger_pb2.ListTagsResponse:
        req = tagger_pb2.ListTagsRequest(filter=tag_filter, page_size=page_size, page_token=page_token)  # type: ignore[arg-type]
        try:
            return await self.stub.ListTags(req, timeout=timeout)
        except grpc.RpcError as exc:
            raise peer_error(exc, self.peer) from None


class ShardClient:
    """One index shard."""

    def __init__(self, name: str, address: str, channel: aio.Channel) -> None:
        self.name = name
        self.address = address
        self.channel = channel
        self.stub = index_pb2_grpc.IndexServiceStub(channel)
        self.peer = f"index shard {name} at {address}"

    async def search(
        self, space: int, query: Matrix, k: int, exclude: Sequence[str], head: str, timeout: float
    ) -> list[Hit]:
        req = index_pb2.SearchRequest(
            space=space,  # type: ignore[arg-type]
            query=to_vector(query),
            k=k,
            exclude_ids=list(exclude),
            semantic_head=head,
        )
        try:
            r = await self.stub.Search(req, timeout=timeout)
        except grpc.RpcError as exc:
            raise peer_error(exc, self.peer) from None
        return [Hit(h.id, h.score, dict(h.metadata), h.source_name, h.shard or self.name) for h in r.hits]

    async def upsert(self, records: Sequence[NewRecord], timeout: float) -> list[index_pb2.WriteResult]:
        req = index_pb2.UpsertRequest(
            records=[
                index_pb2.Record(
                    id=r.id,
                    visual=to_vector(r.visual),
                    semantic=to_vector(r.semantic),
                    metadata=r.metadata,
                    source_name=r.source_name,
                    semantic_head=r.semantic_head,
                    feature_norm=r.feature_norm,
                    top_logits=[index_pb2.ClassLogit(class_index=c, logit=v) for c, v in r.top_logits],
                )
                for r in records
            ]
        )
        try:
            resp = await self.stub.Upsert(req, timeout=timeout)
        except grpc.RpcError as exc:
            raise peer_error(exc, self.peer) from None
        return list(resp.results)

    async def delete(self, ids: Sequence[str], timeout: float) -> list[index_pb2.WriteResult]:
        try:
            resp = await self.stub.Delete(index_pb2.DeleteRequest(ids=list(ids)), timeout=timeout)
        except grpc.RpcError as exc:
            raise peer_error(exc, self.peer) from None
        return list(resp.results)

    async def get(
        self, ids: Sequence[str], include_vectors: bool, timeout: float
    ) -> tuple[list[StoredRecord], list[str]]:
        try:
            resp = await self.stub.Get(
                index_pb2.GetRequest(ids=list(ids), include_vectors=include_vectors), timeout=timeout
            )
        except grpc.RpcError as exc:
            raise peer_error(exc, self.peer) from None
        records = [
            StoredRecord(
                id=r.id,
                metadata=dict(r.metadata),
                source_name=r.source_name,
                created_ms=r.created_unix_ms,
                shard=self.name,
                visual=from_vector(r.visual) if include_vectors and r.visual.values else None,
                semantic=from_vector(r.semantic) if include_vectors and r.semantic.values else None,
                semantic_head=r.semantic_head,
            )
            for r in resp.records
        ]
        return records, list(resp.missing_ids)

    async def scan(
        self, page_size: int, page_token: str, skip_head: str, timeout: float
    ) -> tuple[list[index_pb2.Record], str]:
        req = index_pb2.ScanRequest(page_size=page_size, page_token=page_token, skip_semantic_head=skip_head)
        try:
            resp = await self.stub.Scan(req, timeout=timeout)
        except grpc.RpcError as exc:
            raise peer_error(exc, self.peer) from None
        return list(resp.records), resp.next_page_token

    async def set_semantic(
        self, updates: Sequence[tuple[str, Matrix]], head: str, timeout: float
    ) -> list[index_pb2.WriteResult]:
        req = index_pb2.SetSemanticRequest(
            updates=[index_pb2.SemanticUpdate(id=i, semantic=to_vector(v), semantic_head=head) for i, v in updates]
        )
        try:
            resp = await self.stub.SetSemantic(req, timeout=timeout)
        except grpc.RpcError as exc:
            raise peer_error(exc, self.peer) from None
        return list(resp.results)


def shard_for(image_id: str, shards: Sequence[ShardClient]) -> ShardClient:
    """Rendezvous (highest-random-weight) hashing: stable per id, and adding a shard moves only ~1/n ids."""

    def weight(shard: ShardClient) -> bytes:
        return hashlib.sha256(f"{shard.name}\x00{image_id}".encode()).digest()

    return max(shards, key=weight)
