"""Protobuf ↔ domain conversions shared by the blocking and the async gateway clients."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import UTC, datetime

import grpc

from imgsearch.api.common.v1 import common_pb2
from imgsearch.api.gateway.v1 import gateway_pb2
from imgsearch.client.domain import (
    DEFAULT_K,
    DeleteResults,
    HeadInfo,
    HeadSwitch,
    HeadSwitchStatus,
    Hit,
    ImageCount,
    ImageSource,
    ImageToAdd,
    ItemOutcome,
    QueryResult,
    SearchFilter,
    SearchResults,
    ShardHeadProgress,
    StoredImage,
    StoredImages,
    Tag,
    TagResults,
    TagScore,
    read_image,
)

SPACES: dict[str, common_pb2.Space.ValueType] = {
    "visual": common_pb2.SPACE_VISUAL,
    "semantic": common_pb2.SPACE_SEMANTIC,
}
FILTERS: dict[str, common_pb2.TagFilter.ValueType] = {
    "all": common_pb2.TAG_FILTER_ALL,
    "seen": common_pb2.TAG_FILTER_SEEN,
    "unseen": common_pb2.TAG_FILTER_UNSEEN,
}
_SPACE_NAMES = {v: k for k, v in SPACES.items()}
_CODE_NAMES = {status.value[0]: status.name for status in grpc.StatusCode}


def k_or_default(k: int | None) -> int:
    """Unset k means the default; 0 and negatives go to the server, which names the allowed range."""
    return DEFAULT_K if k is None else k


def space(name: str) -> common_pb2.Space.ValueType:
    try:
        return SPACES[name]
    except KeyError:
        raise ValueError(f"space must be one of {', '.join(SPACES)}, not {name!r}") from None


def tag_filter(name: str) -> common_pb2.TagFilter.ValueType:
    try:
        return FILTERS[name]
    except KeyError:
        raise ValueError(f"tag filter must be one of {', '.join(FILTERS)}, not {name!r}") from None


def code_name(code: int) -> str:
    return str(_CODE_NAMES.get(code, code))


def outcome(item_id: str, err: common_pb2.ItemError | None, changed: bool, position: int) -> ItemOutcome:
    if err is not None and err.code:
        return ItemOutcome(item_id, False, err.message, code_name(err.code), changed, position)
    return ItemOutcome(item_id, True, None, None, changed, position)


# ---- requests ------------------------------------------------------------------------------------


def add_request(image: ImageToAdd) -> gateway_pb2.AddImagesRequest:
    return gateway_pb2.AddImagesRequest(
        id=image.id, image=image.data, metadata=image.metadata, source_name=image.source_name
    )


def _unix_ms(value: datetime | int | None) -> int:
    if value is None:
        return 0
    if isinstance(value, datetime):
        # A naive datetime is taken as UTC, so the same call means the same instant on every machine.
        aware = value if value.tzinfo is not None else value.replace(tzinfo=UTC)
        return int(aware.timestamp() * 1000)
    return int(value)


def search_options(f: SearchFilter | None, page_token: str | None = None) -> gateway_pb2.SearchOptions:
    """The wire form of a SearchFilter plus a page token."""
    out = gateway_pb2.SearchOptions(page_token=page_token or "")
    if f is None:
        return out
    for key, value in f.metadata.items():
        values = [value] if isinstance(value, str) else list(value)
        out.filter.append(gateway_pb2.FilterTerm(key=key, values=values))
    out.created_after_unix_ms = _unix_ms(f.created_after)
    out.created_before_unix_ms = _unix_ms(f.created_before)
    if f.min_score is not None:
        out.min_score = f.min_score
    return out


def add_stream_request(image: ImageToAdd) -> gateway_pb2.AddImagesStreamRequest:
    return gateway_pb2.AddImagesStreamRequest(
        id=image.id, image=image.data, metadata=image.metadata, source_name=image.source_name
    )


def search_text_request(
    query: str, k: int | None, f: SearchFilter | None = None, page_token: str | None = None
) -> gateway_pb2.SearchByTextRequest:
    return gateway_pb2.SearchByTextRequest(query=query, k=k_or_default(k), options=search_options(f, page_token))


def search_texts_request(
    queries: Sequence[str], k: int | None, f: SearchFilter | None = None
) -> gateway_pb2.SearchByTextsRequest:
    return gateway_pb2.SearchByTextsRequest(queries=list(queries), k=k_or_default(k), options=search_options(f))


def search_image_request(
    image: ImageSource, k: int | None, space_name: str, f: SearchFilter | None = None, page_token: str | None = None
) -> gateway_pb2.SearchByImageRequest:
    return gateway_pb2.SearchByImageRequest(
        image=read_image(image), k=k_or_default(k), space=space(space_name), options=search_options(f, page_token)
    )


def similar_request(
    image_id: str,
    k: int | None,
    space_name: str,
    include_self: bool,
    f: SearchFilter | None = None,
    page_token: str | None = None,
) -> gateway_pb2.SearchByIdRequest:
    return gateway_pb2.SearchByIdRequest(
        id=image_id,
        k=k_or_default(k),
        space=space(space_name),
        include_self=include_self,
        options=search_options(f, page_token),
    )


def examples_request(
    positive: Sequence[str],
    negative: Sequence[str],
    text: str,
    k: int | None,
    space_name: str | None,
    f: SearchFilter | None = None,
    page_token: str | None = None,
) -> gateway_pb2.SearchByExamplesRequest:
    return gateway_pb2.SearchByExamplesRequest(
        positive_ids=list(positive),
        negative_ids=list(negative),
        text=text,
        k=k_or_default(k),
        space=space(space_name) if space_name else common_pb2.SPACE_UNSPECIFIED,
        options=search_options(f, page_token),
    )


def tag_request(image: ImageSource, k: int | None, which: str) -> gateway_pb2.TagImageRequest:
    return gateway_pb2.TagImageRequest(image=read_image(image), k=k_or_default(k), filter=tag_filter(which))


def list_tags_request(which: str, page_size: int, token: str) -> gateway_pb2.ListTagsRequest:
    return gateway_pb2.ListTagsRequest(filter=tag_filter(which), page_size=page_size, page_token=token)


def activate_request(head: str, reproject: bool) -> gateway_pb2.ActivateHeadRequest:
    return gateway_pb2.ActivateHeadRequest(head=head, skip_reprojection=not reproject)


def ids(values: Sequence[str] | str) -> list[str]:
    """A list of ids; a lone string is one id, not its characters."""
    return [values] if isinstance(values, str) else list(values)


# ---- responses -----------------------------------------------------------------------------------


def add_outcomes(resp: gateway_pb2.AddImagesResponse | gateway_pb2.AddImagesStreamResponse) -> list[ItemOutcome]:
    return [outcome(r.id, r.error if r.HasField("error") else None, r.created, r.position) for r in resp.results]


def delete_results(resp: gateway_pb2.DeleteImagesResponse) -> DeleteResults:
    outcomes = [outcome(r.id, r.error if r.HasField("error") else None, True, i) for i, r in enumerate(resp.results)]
    return DeleteResults(outcomes, resp.partial)


def stored_images(resp: gateway_pb2.GetImagesResponse) -> StoredImages:
    images = [StoredImage(i.id, dict(i.metadata), i.source_name, i.created_unix_ms, i.shard) for i in resp.images]
    return StoredImages(images, list(resp.missing_ids), resp.partial)


def search_results(
    hits: Iterable[common_pb2.SearchHit], meta: gateway_pb2.SearchMeta, next_page_token: str = ""
) -> SearchResults:
    return SearchResults(
        hits=[Hit(h.id, h.score, dict(h.metadata), h.source_name, h.shard) for h in hits],
        partial=meta.partial,
        failed_shards=list(meta.failed_shards),
        space=_SPACE_NAMES.get(meta.space, "unspecified"),
        head=meta.head,
        next_page_token=next_page_token,
    )


def image_count(r: gateway_pb2.CountImagesResponse) -> ImageCount:
    return ImageCount(r.total, {c.shard: c.images for c in r.shards}, r.partial, list(r.failed_shards))


def query_results(resp: gateway_pb2.SearchByTextsResponse) -> list[QueryResult]:
    out = []
    for r in resp.results:
        if r.HasField("error"):
            code = grpc.StatusCode.UNKNOWN.name
            for status in grpc.StatusCode:
                if status.value[0] == r.error.code:
                    code = status.name
            out.append(QueryResult(r.query, None, r.error.message, code))
        else:
            out.append(QueryResult(r.query, search_results(r.hits, r.meta, r.next_page_token)))
    return out


def tag_results(resp: gateway_pb2.TagImageResponse) -> TagResults:
    return TagResults([TagScore(t.tag, t.score, t.seen) for t in resp.tags], resp.head, resp.vocabulary_size)


def tag_outcomes(results: Iterable[common_pb2.TagResult]) -> list[ItemOutcome]:
    return [outcome(t.tag, t.error if t.HasField("error") else None, t.changed, i) for i, t in enumerate(results)]


def tags(resp: gateway_pb2.ListTagsResponse) -> list[Tag]:
    return [Tag(t.name, t.seen, t.added_unix_ms) for t in resp.tags]


def head(h: gateway_pb2.HeadInfo) -> HeadInfo:
    return HeadInfo(h.name, h.version, h.kind, h.active, dict(h.metrics), h.image_model, h.building, h.description)


def head_status(s: gateway_pb2.HeadSwitchStatus) -> HeadSwitchStatus:
    shards = [ShardHeadProgress(p.shard, p.images, p.done, p.reachable) for p in s.shards]
    return HeadSwitchStatus(s.active, s.building, s.epoch, shards)


def head_switch(resp: gateway_pb2.ActivateHeadResponse) -> HeadSwitch:
    status = head_status(resp.status) if resp.HasField("status") else None
    return HeadSwitch(head(resp.head), resp.previous, resp.reprojected, list(resp.failed_shards), status)
