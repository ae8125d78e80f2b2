"""Gateway proto <-> domain conversions, in one place."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence

from imgsearch.api.common.v1 import common_pb2
from imgsearch.api.gateway.v1 import gateway_pb2
from imgsearch.gateway.core import AddResult, DeleteOutcome, NewImage, SearchResult
from imgsearch.gateway.heads import Activation, SwitchStatus
from imgsearch.gateway.peers import StoredRecord
from imgsearch.gateway.search import ROCCHIO, Rocchio, SearchOptions, filter_terms
from imgsearch.heads import Head, head_id
from imgsearch.kit.convert import item_error
from imgsearch.kit.errors import ImgsearchError


async def new_images(
    requests: AsyncIterator[gateway_pb2.AddImagesRequest] | AsyncIterator[gateway_pb2.AddImagesStreamRequest],
) -> AsyncIterator[NewImage]:
    """AddImages and AddImagesStream messages (the same fields) as NewImages."""
    async for r in requests:
        yield NewImage(id=r.id, data=r.image, metadata=dict(r.metadata), source_name=r.source_name)


def _add_results(
    results: Sequence[AddResult], out: gateway_pb2.AddImagesResponse | gateway_pb2.AddImagesStreamResponse
) -> None:
    for r in results:
        item = out.results.add(position=r.position, id=r.id, created=r.created)
        if r.error is not None:
            item.error.CopyFrom(item_error(r.error))


def add_stream_response(results: Sequence[AddResult]) -> gateway_pb2.AddImagesStreamResponse:
    """One AddImagesStream message: the outcomes of a batch that has just been stored or has failed."""
    out = gateway_pb2.AddImagesStreamResponse()
    _add_results(results, out)
    return out


def add_response(results: Sequence[AddResult]) -> gateway_pb2.AddImagesResponse:
    out = gateway_pb2.AddImagesResponse()
    _add_results(results, out)
    out.added = sum(1 for r in results if r.error is None)
    out.failed = len(results) - out.added
    return out


def delete_response(outcomes: Sequence[DeleteOutcome], partial: bool) -> gateway_pb2.DeleteImagesResponse:
    out = gateway_pb2.DeleteImagesResponse(partial=partial)
    for o in outcomes:
        item = out.results.add(id=o.id)
        if o.error is not None:
            item.error.CopyFrom(item_error(o.error))
    out.deleted = sum(1 for o in outcomes if o.error is None)
    return out


def stored_images(records: Sequence[StoredRecord]) -> list[gateway_pb2.StoredImage]:
    return [
        gateway_pb2.StoredImage(
            id=r.id,
            metadata=r.metadata,
            source_name=r.source_name,
            created_unix_ms=r.created_ms,
            shard=r.shard,
            thumbnail=r.thumbnail,
        )
        for r in records
    ]


def hits(result: SearchResult) -> list[common_pb2.SearchHit]:
    return [
        common_pb2.SearchHit(id=h.id, score=h.score, metadata=h.metadata, source_name=h.source_name, shard=h.shard)
        for h in result.hits
    ]


def search_options(o: gateway_pb2.SearchOptions) -> SearchOptions:
    return SearchOptions(
        filter=filter_terms([(t.key, list(t.values)) for t in o.filter]),
        created_after_ms=o.created_after_unix_ms,
        created_before_ms=o.created_before_unix_ms,
        min_score=o.min_score if o.HasField("min_score") else None,
        page_token=o.page_token,
    )


def rocchio_weights(r: gateway_pb2.SearchByExamplesRequest) -> Rocchio:
    return Rocchio(
        text=r.text_weight if r.HasField("text_weight") else ROCCHIO.text,
        positive=r.positive_weight if r.HasField("positive_weight") else ROCCHIO.positive,
        negative=r.negative_weight if r.HasField("negative_weight") else ROCCHIO.negative,
    )


def texts_response(
    queries: Sequence[str], results: Sequence[SearchResult | ImgsearchError]
) -> gateway_pb2.SearchByTextsResponse:
    out = []
    for query, result in zip(queries, results, strict=True):
        if isinstance(result, ImgsearchError):
            out.append(gateway_pb2.TextSearchResult(query=query, error=item_error(result)))
        else:
            out.append(
                gateway_pb2.TextSearchResult(
                    query=query, hits=hits(result), meta=meta(result), next_page_token=result.next_page_token
                )
            )
    return gateway_pb2.SearchByTextsResponse(results=out)


def meta(result: SearchResult) -> gateway_pb2.SearchMeta:
    return gateway_pb2.SearchMeta(
        partial=result.partial,
        failed_shards=result.failed_shards,
        shards_total=result.shards_total,
        space=result.space,  # type: ignore[arg-type]
        head=result.head,
    )


def head_info(h: Head, status: SwitchStatus) -> gateway_pb2.HeadInfo:
    hid = head_id(h)
    manifest = getattr(h, "manifest", {}) or {}
    return gateway_pb2.HeadInfo(
        name=h.name,
        version=h.version,
        kind=h.kind,
        active=hid == status.config.active,
        building=hid == status.config.building,
        metrics=dict(h.metrics),
        image_model=h.image_model,
        description=str(manifest.get("description", "")),
    )


def switch_status(status: SwitchStatus) -> gateway_pb2.HeadSwitchStatus:
    building = status.config.building
    return gateway_pb2.HeadSwitchStatus(
        active=status.config.active,
        building=building,
        epoch=status.config.epoch,
        shards=[
            gateway_pb2.ShardHeadProgress(
                shard=s.shard,
                images=s.records,
                done=min(s.vectors.get(building, 0), s.records) if building else s.records,
                reachable=s.reachable,
            )
            for s in status.shards
        ],
    )


def heads_response(heads: Sequence[Head], status: SwitchStatus) -> gateway_pb2.ListHeadsResponse:
    return gateway_pb2.ListHeadsResponse(
        heads=[head_info(h, status) for h in heads], active=status.config.active, status=switch_status(status)
    )


def activate_response(activation: Activation) -> gateway_pb2.ActivateHeadResponse:
    return gateway_pb2.ActivateHeadResponse(
        head=head_info(activation.head, activation.status),
        previous=activation.previous,
        failed_shards=activation.failed_shards,
        status=switch_status(activation.status),
    )
