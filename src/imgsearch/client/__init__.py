"""Typed Python SDK for the imgsearch gateway: a blocking and an async client over the same domain types."""

from __future__ import annotations

from imgsearch.client.aio import AsyncGatewayClient
from imgsearch.client.channel import DEFAULT_ADDRESS, AddressError, check_address, default_address
from imgsearch.client.convert import FILTERS, SPACES
from imgsearch.client.domain import (
    DEFAULT_K,
    DeleteResults,
    HeadInfo,
    HeadSwitch,
    Hit,
    ImageCount,
    ImageSource,
    ImageToAdd,
    ItemOutcome,
    QueryResult,
    SearchFilter,
    SearchResults,
    StoredImage,
    StoredImages,
    Tag,
    TagCount,
    TagResults,
    TagScore,
)
from imgsearch.client.sync import GatewayClient

__all__ = [
    "DEFAULT_ADDRESS",
    "DEFAULT_K",
    "FILTERS",
    "SPACES",
    "AddressError",
    "AsyncGatewayClient",
    "DeleteResults",
    "GatewayClient",
    "HeadInfo",
    "HeadSwitch",
    "Hit",
    "ImageCount",
    "ImageSource",
    "ImageToAdd",
    "ItemOutcome",
    "QueryResult",
    "SearchFilter",
    "SearchResults",
    "StoredImage",
    "StoredImages",
    "Tag",
    "TagCount",
    "TagResults",
    "TagScore",
    "check_address",
    "default_address",
]
