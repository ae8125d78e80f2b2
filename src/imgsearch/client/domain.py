"""The SDK's domain types: plain dataclasses that both clients return, never raw protobuf messages."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import NamedTuple

DEFAULT_K = 10
SPACE_NAMES = ("visual", "semantic")
FILTER_NAMES = ("all", "seen", "unseen")

# A path to an image file (str or Path) or the image's encoded bytes.
ImageSource = bytes | str | os.PathLike[str]


def read_image(source: ImageSource) -> bytes:
    """The encoded bytes of an image given as bytes or as a path."""
    if isinstance(source, bytes | bytearray | memoryview):
        return bytes(source)
    return Path(source).read_bytes()


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
    # Pass as page_token (same query and filter) for the next page; empty after the last one.
    next_page_token: str = ""


@dataclass(frozen=True)
class SearchFilter:
    """What narrows a search: metadata (key -> value, or any of several values; all keys must match),
    the time an image was added (datetime, or Unix milliseconds; after inclusive, before exclusive), and a
    minimum score."""

    metadata: Mapping[str, str | Sequence[str]] = field(default_factory=dict)
    created_after: datetime | int | None = None
    created_before: datetime | int | None = None
    min_score: float | None = None


@dataclass(frozen=True)
class QueryResult:
    """One query of a batch: its results, or why it failed (the others are unaffected)."""

    query: str
    results: SearchResults | None
    error: str | None = None
    code: str | None = None


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
    """Outcome of one item of a batch: `error` is None on success; `position` counts from 0 in the request."""

    id: str
    ok: bool
    error: str | None = None
    code: str | None = None
    changed: bool = False
    position: int = 0


class DeleteResults(NamedTuple):
    """Outcomes of a delete; a tuple so `outcomes, partial = client.delete_images(...)` keeps working."""

    results: list[ItemOutcome]
    partial: bool


@dataclass(frozen=True)
class StoredImage:
    id: str
    metadata: dict[str, str]
    source_name: str
    created_unix_ms: int
    shard: str


@dataclass(frozen=True)
class StoredImages:
    """Images found by id; `missing_ids` were not stored, `partial` means some shards did not answer."""

    images: list[StoredImage]
    missing_ids: list[str]
    partial: bool


@dataclass(frozen=True)
class Tag:
    name: str
    seen: bool
    added_unix_ms: int


@dataclass(frozen=True)
class ImageCount:
    """Images stored, in all and per shard; partial when some shard did not answer."""

    total: int
    shards: dict[str, int]
    partial: bool = False
    failed_shards: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class TagCount:
    """Size of the live vocabulary under one filter."""

    filter: str
    total: int


@dataclass(frozen=True)
class HeadInfo:
    name: str
    version: str
    kind: str
    active: bool
    metrics: dict[str, float]
    image_model: str
    building: bool = False
    description: str = ""


@dataclass(frozen=True)
class ShardHeadProgress:
    """How far one shard is with the head being built (`reachable` False: last numbers seen)."""

    shard: str
    images: int
    done: int
    reachable: bool


@dataclass(frozen=True)
class HeadSwitchStatus:
    """The cluster's head configuration: the head queries use, the one being built (empty: none), per shard."""

    active: str
    building: str
    epoch: int
    shards: list[ShardHeadProgress]


@dataclass(frozen=True)
class HeadSwitch:
    """A switch as started: it builds in the background, then flips (follow it with head_status)."""

    head: HeadInfo
    previous: str
    reprojected: int
    failed_shards: list[str]
    status: HeadSwitchStatus | None = None


@dataclass
class ImageToAdd:
    """An image for add_images: bytes, optional id (default: content hash), metadata, source name."""

    data: bytes
    id: str = ""
    metadata: dict[str, str] = field(default_factory=dict)
    source_name: str = ""

    @classmethod
    def from_path(
        cls, path: str | os.PathLike[str], image_id: str = "", metadata: Mapping[str, str] | None = None
    ) -> ImageToAdd:
        """Read an image file; its path becomes the source name."""
        p = Path(path)
        return cls(p.read_bytes(), image_id, dict(metadata or {}), str(p))
