"""Blocking gateway client: `GatewayClient`, the same methods as the async one, on grpc's sync channel."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import grpc

from imgsearch.api.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from imgsearch.client import convert
from imgsearch.client.channel import DEFAULT_TIMEOUT, Connection
from imgsearch.client.domain import (
    DeleteResults,
    HeadInfo,
    HeadSwitch,
    HeadSwitchStatus,
    ImageCount,
    ImageSource,
    ImageToAdd,
    ItemOutcome,
    QueryResult,
    SearchFilter,
    SearchResults,
    StoredImages,
    Tag,
    TagCount,
    TagResults,
)

ADD_TIMEOUT = 300.0
ACTIVATE_TIMEOUT = 3600.0


class GatewayClient:
    """Blocking client over GatewayService; errors surface as grpc.RpcError with the server's status."""

    def __init__(
        self,
        address: str | None = None,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        token: str | None = None,
        ca_file: str | os.PathLike[str] | None = None,
        max_message_mb: int = 64,
    ) -> None:
        self.connection = Connection.make(address, timeout, token, ca_file, max_message_mb)
        creds = self.connection.credentials()
        options = self.connection.options
        self.channel = (
            grpc.insecure_channel(self.address, options=options)
            if creds is None
            else grpc.secure_channel(self.address, creds, options=options)
        )
        self.stub = gateway_pb2_grpc.GatewayServiceStub(self.channel)

    @property
    def address(self) -> str:
        return self.connection.address

    @property
    def timeout(self) -> float:
        return self.connection.timeout

    @property
    def ca_file(self) -> Path | None:
        return self.connection.ca_file

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> GatewayClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, method: Any, request: Any, timeout: float | None = None) -> Any:
        return method(request, timeout=timeout or self.timeout, metadata=self.connection.metadata)

    # ---- images ---------------------------------------------------------------------------------

    def add_images(
        self,
        images: Iterable[ImageToAdd],
        timeout: float | None = None,
        on_result: Callable[[ItemOutcome], None] | None = None,
    ) -> list[ItemOutcome]:
        """Stream images in one call; one outcome per image, in order.

        on_result, when given, is called with each outcome as soon as the gateway has stored (or failed)
        that image, while later images are still being sent: the way to show real progress.
        """
        outcomes = []
        for o in self.add_images_stream(images, timeout):
            outcomes.append(o)
            if on_result is not None:
                on_result(o)
        return sorted(outcomes, key=lambda o: o.position)

    def add_images_stream(self, images: Iterable[ImageToAdd], timeout: float | None = None) -> Iterator[ItemOutcome]:
        """Stream images in; yield each image's outcome as it is stored (completion order, see `position`).

        `images` is read lazily from a gRPC thread while outcomes come back, so a generator reading files
        from disk overlaps with the gateway's work. Every image gets exactly one outcome.
        """
        requests = (convert.add_stream_request(im) for im in images)
        responses = self._call(self.stub.AddImagesStream, requests, timeout or max(self.timeout, ADD_TIMEOUT))
        for resp in responses:
            yield from convert.add_outcomes(resp)

    def delete_images(self, ids: Sequence[str] | str) -> DeleteResults:
        req = gateway_pb2.DeleteImagesRequest(ids=convert.ids(ids))
        return convert.delete_results(self._call(self.stub.DeleteImages, req))

    def get_images(self, ids: Sequence[str] | str) -> StoredImages:
        req = gateway_pb2.GetImagesRequest(ids=convert.ids(ids))
        return convert.stored_images(self._call(self.stub.GetImages, req))

    # ---- searches -------------------------------------------------------------------------------

    def search_text(
        self, query: str, k: int | None = None, filter: SearchFilter | None = None, page_token: str | None = None
    ) -> SearchResults:
        """Images matching a text query; `filter` narrows it, `page_token` (from the last page) pages on."""
        r = self._call(self.stub.SearchByText, convert.search_text_request(query, k, filter, page_token))
        return convert.search_results(r.hits, r.meta, r.next_page_token)

    def search_texts(
        self, queries: Sequence[str], k: int | None = None, filter: SearchFilter | None = None
    ) -> list[QueryResult]:
        """Several text queries in one call; each succeeds or fails alone."""
        r = self._call(self.stub.SearchByTexts, convert.search_texts_request(queries, k, filter))
        return convert.query_results(r)

    def search_image(
        self,
        image: ImageSource,
        k: int | None = None,
        space: str = "visual",
        filter: SearchFilter | None = None,
        page_token: str | None = None,
    ) -> SearchResults:
        """Images like `image` (bytes, or a path to read)."""
        request = convert.search_image_request(image, k, space, filter, page_token)
        r = self._call(self.stub.SearchByImage, request)
        return convert.search_results(r.hits, r.meta, r.next_page_token)

    def similar(
        self,
        image_id: str,
        k: int | None = None,
        space: str = "visual",
        include_self: bool = False,
        filter: SearchFilter | None = None,
        page_token: str | None = None,
    ) -> SearchResults:
        """Images like a stored one."""
        request = convert.similar_request(image_id, k, space, include_self, filter, page_token)
        r = self._call(self.stub.SearchById, request)
        return convert.search_results(r.hits, r.meta, r.next_page_token)

    def search_by_examples(
        self,
        positive: Sequence[str] = (),
        negative: Sequence[str] = (),
        text: str = "",
        k: int | None = None,
        space: str | None = None,
        filter: SearchFilter | None = None,
        page_token: str | None = None,
    ) -> SearchResults:
        """Relevance feedback: images like the `positive` ids, unlike the `negative` ones, optionally with text."""
        request = convert.examples_request(positive, negative, text, k, space, filter, page_token)
        r = self._call(self.stub.SearchByExamples, request)
        return convert.search_results(r.hits, r.meta, r.next_page_token)

    # ---- tags -----------------------------------------------------------------------------------

    def tag(self, image: ImageSource, k: int | None = None, which: str = "all") -> TagResults:
        """Rank the live vocabulary against `image` (bytes, or a path to read)."""
        return convert.tag_results(self._call(self.stub.TagImage, convert.tag_request(image, k, which)))

    def add_tags(self, tags: Sequence[str] | str) -> list[ItemOutcome]:
        r = self._call(self.stub.AddTags, gateway_pb2.AddTagsRequest(tags=convert.ids(tags)))
        return convert.tag_outcomes(r.results)

    def remove_tags(self, tags: Sequence[str] | str) -> list[ItemOutcome]:
        r = self._call(self.stub.RemoveTags, gateway_pb2.RemoveTagsRequest(tags=convert.ids(tags)))
        return convert.tag_outcomes(r.results)

    def list_tags(self, which: str = "all", page_size: int = 1000) -> Iterator[Tag]:
        """Every tag of the vocabulary (or only seen/unseen ones), following pages."""
        token = ""
        while True:
            r = self._call(self.stub.ListTags, convert.list_tags_request(which, page_size, token))
            yield from convert.tags(r)
            token = r.next_page_token
            if not token:
                return

    def count_images(self) -> ImageCount:
        """How many images are stored (per shard too)."""
        return convert.image_count(self._call(self.stub.CountImages, gateway_pb2.CountImagesRequest()))

    def count_tags(self, which: str = "all") -> TagCount:
        """Size of the vocabulary (or of its seen/unseen part), without listing it."""
        r = self._call(self.stub.ListTags, convert.list_tags_request(which, 1, ""))
        return TagCount(which, r.total)

    # ---- heads ----------------------------------------------------------------------------------

    def list_heads(self) -> list[HeadInfo]:
        r = self._call(self.stub.ListHeads, gateway_pb2.ListHeadsRequest())
        return [convert.head(h) for h in r.heads]

    def head_status(self) -> HeadSwitchStatus:
        """The head queries use, the one being built (if a switch is under way) and each shard's progress."""
        r = self._call(self.stub.ListHeads, gateway_pb2.ListHeadsRequest())
        return convert.head_status(r.status)

    def activate_head(self, head: str, reproject: bool = True, timeout: float = ACTIVATE_TIMEOUT) -> HeadSwitch:
        """Start switching heads: the gateway builds the new head's space in the background, then flips."""
        return convert.head_switch(
            self._call(self.stub.ActivateHead, convert.activate_request(head, reproject), timeout)
        )
