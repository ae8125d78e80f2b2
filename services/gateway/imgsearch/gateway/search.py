"""Search options (metadata filter, time range, min score, paging) and the merge of shard answers."""

from __future__ import annotations

import base64
import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from imgsearch.kit.errors import InvalidArgument

DEFAULT_K = 10
MAX_FILTER_TERMS = 16
MAX_FILTER_VALUES = 256


@dataclass(frozen=True)
class Cursor:
    """Where a page ended: hits rank by score (descending), then id (ascending)."""

    score: float
    id: str


@dataclass(frozen=True)
class Rocchio:
    """Weights of relevance feedback: the text, the mean of the positives, the mean of the negatives."""

    text: float = 1.0
    positive: float = 0.75
    negative: float = 0.15

    def check(self) -> None:
        for name, value in (("text", self.text), ("positive", self.positive), ("negative", self.negative)):
            if not (math.isfinite(value) and value >= 0):
                raise InvalidArgument(f"{name}_weight must be a finite number >= 0, got {value}")

    def key(self) -> str:
        return f"{self.text}/{self.positive}/{self.negative}"


ROCCHIO = Rocchio()


def rocchio(
    text: npt.NDArray[np.float32] | None,
    positives: Sequence[npt.NDArray[np.float32]],
    negatives: Sequence[npt.NDArray[np.float32]],
    weights: Rocchio,
) -> npt.NDArray[np.float32]:
    """Rocchio's query: a*text + b*mean(positives) - c*mean(negatives), L2-normalised (Rocchio 1971)."""
    dim = next(v.shape[0] for v in [*([text] if text is not None else []), *positives, *negatives])
    q = np.zeros(dim, dtype=np.float64)
    if text is not None:
        q += weights.text * text.astype(np.float64)
    if positives:
        q += weights.positive * np.mean(np.stack(positives).astype(np.float64), axis=0)
    if negatives:
        q -= weights.negative * np.mean(np.stack(negatives).astype(np.float64), axis=0)
    norm = float(np.linalg.norm(q))
    if norm < 1e-9:
        raise InvalidArgument("the examples cancel out: the positive and negative examples are the same images")
    return (q / norm).astype(np.float32)


@dataclass(frozen=True)
class SearchOptions:
    """What narrows a search, as the caller asked; `after` is the decoded page token."""

    filter: tuple[tuple[str, tuple[str, ...]], ...] = ()
    created_after_ms: int = 0
    created_before_ms: int = 0
    min_score: float | None = None
    page_token: str = ""

    def key(self) -> str:
        """Everything but the page token: a token is only valid for the query and options that made it."""
        return json.dumps(
            [self.filter, self.created_after_ms, self.created_before_ms, self.min_score], separators=(",", ":")
        )


def default_k(k: int) -> int:
    """Unset k (0 on the wire) means the default everywhere: proto, HTTP, SDK and CLI."""
    return k or DEFAULT_K


def check_options(options: SearchOptions) -> SearchOptions:
    """Validate before any work is done; the shards check the same again."""
    if len(options.filter) > MAX_FILTER_TERMS:
        raise InvalidArgument(f"filter has {len(options.filter)} terms, at most {MAX_FILTER_TERMS} allowed")
    for key, values in options.filter:
        if not key:
            raise InvalidArgument("a filter term has an empty metadata key")
        if not values:
            raise InvalidArgument(f"filter term {key!r} has no values: give one (equality) or several (any of)")
        if len(values) > MAX_FILTER_VALUES:
            raise InvalidArgument(f"filter term {key!r} has {len(values)} values, at most {MAX_FILTER_VALUES}")
    after, before = options.created_after_ms, options.created_before_ms
    if after < 0 or before < 0:
        raise InvalidArgument("created_after/created_before must be Unix milliseconds (0 = unbounded)")
    if after and before and after >= before:
        raise InvalidArgument(f"created_after ({after}) must be before created_before ({before})")
    if options.min_score is not None and not math.isfinite(options.min_score):
        raise InvalidArgument(f"min_score must be a finite number, got {options.min_score}")
    return options


def digest(*parts: str | bytes) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part.encode() if isinstance(part, str) else part)
        h.update(b"\x00")
    return h.hexdigest()[:16]


def encode_token(cursor: Cursor, query_digest: str) -> str:
    raw = json.dumps({"s": cursor.score, "i": cursor.id, "q": query_digest}, separators=(",", ":"))
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def decode_token(token: str, query_digest: str) -> Cursor | None:
    """The cursor a page token carries; INVALID_ARGUMENT when it is not ours or belongs to another query."""
    if not token:
        return None
    try:
        raw = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
        cursor = Cursor(float(raw["s"]), str(raw["i"]))
        made_for = str(raw["q"])
    except (ValueError, KeyError, TypeError):
        raise InvalidArgument("page_token is not one this service issued") from None
    if made_for != query_digest:
        raise InvalidArgument(
            "page_token belongs to another query, other options or another head: repeat the first query to start again"
        )
    return cursor


def rank_key(score: float, image_id: str) -> tuple[float, str]:
    return (-score, image_id)


def filter_terms(pairs: Sequence[tuple[str, Sequence[str]]]) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """Terms (AND) in a canonical order, each one's values (any of) sorted: the order does not change a token."""
    return tuple(sorted((key, tuple(sorted(set(values)))) for key, values in pairs))
