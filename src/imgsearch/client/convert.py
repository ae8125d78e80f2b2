"""Protobuf ↔ domain conversions shared by the blocking and the async gateway clients."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

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
    ImageSource,
    ImageToAdd,
    ItemOutcome,
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


def search_text_request(query: str, k: int | None) -> gateway_pb2.SearchByTextRequest:
    return gateway_pb2.SearchByTextRequest(query=query, k=k_or_default(k))


def search_image_request(image: ImageSource, k: int | None, space_name: str) -> gateway_pb2.SearchByImageRequest:
    return gateway_pb2.SearchByImageRequest(image=read_image(image), k=k_or_default(k), space=space(space_name))


def similar_request(image_id: str, k: int | None, space_name: str, include_self: bool) -> gateway_pb2.SearchByIdRequest:
    return gateway_pb2.SearchByIdRequest(
        id=image_id, k=k_or_default(k), space=space(space_name), include_self=include_self
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


def add_outcomes(resp: gateway_pb2.AddImagesResponse) -> list[ItemOutcome]:
    return [outcome(r.id, r.error if r.HasField("error") else None, r.created, r.position) for r in resp.results]


def delete_results(resp: gateway_pb2.DeleteImagesResponse) -> DeleteResults:
    outcomes = [outcome(r.id, r.error if r.HasField("error") else None, True, i) for i, r in enumerate(resp.results)]
    return DeleteResults(outcomes, resp.partial)


def stored_images(resp: gateway_pb2.GetImagesResponse) -> StoredImages:
    images = [StoredImage(i.id, dict(i.metadata), i.source_name, i.created_unix_ms, i.shard) for i in resp.images]
    return StoredImages(images, list(resp.missing_ids), resp.partial)


def search_results(hits: Iterable[common_pb2.SearchHit], meta: gateway_pb2.SearchMeta) -> SearchResults:
    return SearchResults(
        hits=[Hit(h.id, h.score, dict(h.metadata), h.source_name, h.shard) for h in hits],
        partial=meta.partial,
        failed_shards=list(meta.failed_shards),
        space=_SPACE_NAMES.get(meta.space, "unspecified"),
        head=meta.head,
    )


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
