"""Typed Python client for the imgsearch gateway."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from imgsearch.api.common.v1 import common_pb2
from imgsearch.api.gateway.v1 import gateway_pb2, gateway_pb2_grpc

DEFAULT_ADDRESS = "127.0.0.1:50050"
SPACES = {"visual": common_pb2.SPACE_VISUAL, "semantic": common_pb2.SPACE_SEMANTIC}
FILTERS = {"all": common_pb2.TAG_FILTER_ALL, "seen": common_pb2.TAG_FILTER_SEEN, "unseen": common_pb2.TAG_FILTER_UNSEEN}


def default_address() -> str:
    return os.environ.get("IMGSEARCH_ADDRESS", DEFAULT_ADDRESS)


@dataclass(frozen=True)
class Hit:
    id: str
    score: float
    metadata: dict[str, str]
    source_name: str
    shard: str


@dataclass(frozen=True)
class SearchResults:
    hits: list[Hit]
    partial: bool
    failed_shards: list[str]
    space: str
    head: str


@dataclass(frozen=True)
class TagScore:
    tag: str
    score: float
    seen: bool


@dataclass(frozen=True)
class TagResults:
    tags: list[TagScore]
    head: str
    vocabulary_size: int


@dataclass(frozen=True)
class ItemOutcome:
    """Outcome of one item of a batch: `error` is None on success."""

    id: str
    ok: bool
    error: str | None = None
    code: str | None = None
    changed: bool = False


@dataclass(frozen=True)
class Tag:
    name: str
    seen: bool
    added_unix_ms: int


@dataclass(frozen=True)
class HeadInfo:
    name: str
    version: str
    kind: str
    active: bool
    metrics: dict[str, float]
    image_model: str


@dataclass(frozen=True)
class HeadSwitch:
    head: HeadInfo
    previous: str
    reprojected: int
    failed_shards: list[str]


def _head(h: gateway_pb2.HeadInfo) -> HeadInfo:
    return HeadInfo(h.name, h.version, h.kind, h.active, dict(h.metrics), h.image_model)


@dataclass
class ImageToAdd:
    """An image for add_images: bytes, optional id (default: content hash), metadata, source name."""

    data: bytes
    id: str = ""
    metadata: dict[str, str] = field(default_factory=dict)
    source_name: str = ""

    @classmethod
    def from_path(cls, path: Path, image_id: str = "", metadata: Mapping[str, str] | None = None) -> ImageToAdd:
        return cls(path.read_bytes(), image_id, dict(metadata or {}), str(path))


def _code_name(code: int) -> str:
    for status in grpc.StatusCode:
        if status.value[0] == code:
            return str(status.name)
    return str(code)


def _outcome(item_id: str, err: common_pb2.ItemError | None, changed: bool = False) -> ItemOutcome:
    if err is not None and err.code:
        return ItemOutcome(item_id, False, err.message, _code_name(err.code), changed)
    return ItemOutcome(item_id, True, None, None, changed)


def _search(hits: Iterable[common_pb2.SearchHit], meta: gateway_pb2.SearchMeta) -> SearchResults:
    space = {v: k for k, v in SPACES.items()}.get(meta.space, "unspecified")
    return SearchResults(
        hits=[Hit(h.id, h.score, dict(h.metadata), h.source_name, h.shard) for h in hits],
        partial=meta.partial,
        failed_shards=list(meta.failed_shards),
        space=space,
        head=meta.head,
    )


class GatewayClient:
    """Blocking client over GatewayService; errors surface as grpc.RpcError with the server's status."""

    def __init__(
        self,
        address: str | None = None,
        *,
        timeout: float = 30.0,
        token: str | None = None,
        ca_file: Path | None = None,
        max_message_mb: int = 64,
    ) -> None:
        self.address = address or default_address()
        self.timeout = timeout
        options: list[tuple[str, Any]] = [
            ("grpc.max_send_message_length", max_message_mb * 1024 * 1024),
            ("grpc.max_receive_message_length", max_message_mb * 1024 * 1024),
        ]
        if ca_file is not None:
            creds = grpc.ssl_channel_credentials(root_certificates=Path(ca_file).read_bytes())
            self.channel = grpc.secure_channel(self.address, creds, options=options)
        else:
            self.channel = grpc.insecure_channel(self.address, options=options)
        self.stub = gateway_pb2_grpc.GatewayServiceStub(self.channel)
        self.metadata: list[tuple[str, str]] = [("authorization", f"Bearer {token}")] if token else []

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> GatewayClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, method: Any, request: Any, timeout: float | None = None) -> Any:
        return method(request, timeout=timeout or self.timeout, metadata=self.metadata)

    # ---- images ---------------------------------------------------------------------------------

    def add_images(self, images: Iterable[ImageToAdd], timeout: float | None = None) -> list[ItemOutcome]:
        """Stream images in one call; one outcome per image, in order."""

        def requests() -> Iterator[gateway_pb2.AddImagesRequest]:
            for im in images:
                yield gateway_pb2.AddImagesRequest(
                    id=im.id, image=im.data, metadata=im.metadata, source_name=im.source_name
                )

        resp = self._call(self.stub.AddImages, requests(), timeout or max(self.timeout, 300.0))
        return [_outcome(r.id, r.error if r.HasField("error") else None, r.created) for r in resp.results]

    def delete_images(self, ids: Sequence[str]) -> tuple[list[ItemOutcome], bool]:
        resp = self._call(self.stub.DeleteImages, gateway_pb2.DeleteImagesRequest(ids=list(ids)))
        outcomes = [_outcome(r.id, r.error if r.HasField("error") else None, True) for r in resp.results]
        return outcomes, resp.partial

    def get_images(self, ids: Sequence[str]) -> gateway_pb2.GetImagesResponse:
        return self._call(self.stub.GetImages, gateway_pb2.GetImagesRequest(ids=list(ids)))  # type: ignore[no-any-return]

    # ---- searches -------------------------------------------------------------------------------

    def search_text(self, query: str, k: int = 10) -> SearchResults:
        r = self._call(self.stub.SearchByText, gateway_pb2.SearchByTextRequest(query=query, k=k))
        return _search(r.hits, r.meta)

    def search_image(self, data: bytes, k: int = 10, space: str = "visual") -> SearchResults:
        req = gateway_pb2.SearchByImageRequest(image=data, k=k, space=SPACES[space])  # type: ignore[arg-type]
        r = self._call(self.stub.SearchByImage, req)
        return _search(r.hits, r.meta)

    def similar(self, image_id: str, k: int = 10, space: str = "visual", include_self: bool = False) -> SearchResults:
        req = gateway_pb2.SearchByIdRequest(
            id=image_id,
            k=k,
            space=SPACES[space],  # type: ignore[arg-type]
            include_self=include_self,
        )
        r = self._call(self.stub.SearchById, req)
        return _search(r.hits, r.meta)

    # ---- tags -----------------------------------------------------------------------------------

    def tag(self, data: bytes, k: int = 10, which: str = "all") -> TagResults:
        req = gateway_pb2.TagImageRequest(image=data, k=k, filter=FILTERS[which])  # type: ignore[arg-type]
        r = self._call(self.stub.TagImage, req)
        return TagResults([TagScore(t.tag, t.score, t.seen) for t in r.tags], r.head, r.vocabulary_size)

    def add_tags(self, tags: Sequence[str]) -> list[ItemOutcome]:
        r = self._call(self.stub.AddTags, gateway_pb2.AddTagsRequest(tags=list(tags)))
        return [_outcome(t.tag, t.error if t.HasField("error") else None, t.changed) for t in r.results]

    def remove_tags(self, tags: Sequence[str]) -> list[ItemOutcome]:
        r = self._call(self.stub.RemoveTags, gateway_pb2.RemoveTagsRequest(tags=list(tags)))
        return [_outcome(t.tag, t.error if t.HasField("error") else None, t.changed) for t in r.results]

    def list_tags(self, which: str = "all", page_size: int = 1000) -> Iterator[Tag]:
        """Every tag of the vocabulary (or only seen/unseen ones), following pages."""
        token = ""
        while True:
            req = gateway_pb2.ListTagsRequest(filter=FILTERS[which], page_size=page_size, page_token=token)  # type: ignore[arg-type]
            r = self._call(self.stub.ListTags, req)
            for t in r.tags:
                yield Tag(t.name, t.seen, t.added_unix_ms)
            token = r.next_page_token
            if not token:
                return

    # ---- heads ----------------------------------------------------------------------------------

    def list_heads(self) -> list[HeadInfo]:
        r = self._call(self.stub.ListHeads, gateway_pb2.ListHeadsRequest())
        return [_head(h) for h in r.heads]

    def activate_head(self, head: str, reproject: bool = True, timeout: float = 3600.0) -> HeadSwitch:
        """Switch the projection head; by default re-projects every stored image (can take a while)."""
        req = gateway_pb2.ActivateHeadRequest(head=head, skip_reprojection=not reproject)
        r = self._call(self.stub.ActivateHead, req, timeout)
        return HeadSwitch(_head(r.head), r.previous, r.reprojected, list(r.failed_shards))
