"""In-memory fakes of the gateway's peers (encoder, tagger, index shards) and helpers to build a head catalog."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np

from imgsearch.api.common.v1 import common_pb2
from imgsearch.api.index.v1 import index_pb2
from imgsearch.api.tagger.v1 import tagger_pb2
from imgsearch.gateway.core import Gateway, NewImage
from imgsearch.gateway.heads import HeadConfig, ShardHeads, StoredSignals
from imgsearch.gateway.peers import Hit, NewRecord, RankedTags, ShardQuery, StoredRecord
from imgsearch.gateway.settings import GatewaySettings
from imgsearch.heads import HeadCatalog, save_head
from imgsearch.kit.convert import Matrix, item_error
from imgsearch.kit.encoder_client import EncodedImage
from imgsearch.kit.errors import FailedPrecondition, ImgsearchError, InvalidArgument, Unavailable
from imgsearch.kit.peers import PeerError
from imgsearch.models.manifest import ModelInfo

FEATURE_DIM = 1280
TEXT_DIM = 384
CLASSES = 1000
IMAGE_MODEL_VERSION = "efficientnet-lite0@0123456789ab"
SPACE_VISUAL = common_pb2.SPACE_VISUAL
SPACE_SEMANTIC = common_pb2.SPACE_SEMANTIC
# Scan's page size limit in the index contract (ScanRequest.page_size: 1..1000).
SCAN_MAX_PAGE = 1000


def _rng(kind: str, data: bytes) -> np.random.Generator:
    seed = int.from_bytes(hashlib.sha256(kind.encode() + b"\x00" + data).digest()[:8], "little")
    return np.random.default_rng(seed)


def image_features(data: bytes) -> Matrix:
    """The fake encoder's raw CNN features of an image: deterministic in its bytes (non-negative, like ReLU output)."""
    return np.abs(_rng("features", data).standard_normal(FEATURE_DIM)).astype(np.float32)


def image_logits(data: bytes) -> Matrix:
    """The fake encoder's ImageNet logits of an image."""
    return (3.0 * _rng("logits", data).standard_normal(CLASSES)).astype(np.float32)


def text_embedding(text: str) -> Matrix:
    """The fake encoder's (L2-normalised) text embedding."""
    v = _rng("text", text.encode()).standard_normal(TEXT_DIM)
    return (v / np.linalg.norm(v)).astype(np.float32)


def fake_thumbnail(data: bytes, px: int) -> bytes:
    """The fake encoder's thumbnail of an image: marker bytes naming the size and the image."""
    return b"thumbnail %d of " % px + hashlib.sha256(data).hexdigest().encode()


class FakeEncoder:
    """Deterministic encoder: features/logits seeded by the image bytes; chosen items fail with InvalidArgument.

    Thumbnails, when asked for, are fake_thumbnail's markers; thumbnails=False plays an encoder that predates them.
    """

    def __init__(self, info: ModelInfo, corrupt: Iterable[bytes] = (), thumbnails: bool = True) -> None:
        self.info = info
        self.corrupt = set(corrupt)
        self.thumbnails = thumbnails
        self.image_calls: list[list[bytes]] = []
        # The thumbnail_px of each encode_images call, in call order.
        self.thumbnail_requests: list[int] = []
        self.text_calls: list[list[str]] = []

    @property
    def images_seen(self) -> list[bytes]:
        return [data for call in self.image_calls for data in call]

    async def model_info(self, timeout: float) -> ModelInfo:
        return self.info

    async def encode_texts(self, texts: Sequence[str], timeout: float) -> list[Matrix | ImgsearchError]:
        self.text_calls.append(list(texts))
        return [text_embedding(t) for t in texts]

    async def encode_images(
        self, images: Sequence[tuple[bytes, str]], include_logits: bool, timeout: float, thumbnail_px: int = 0
    ) -> list[EncodedImage]:
        self.image_calls.append([data for data, _ in images])
        self.thumbnail_requests.append(thumbnail_px)
        out = []
        for data, name in images:
            if data in self.corrupt:
                out.append(EncodedImage(error=InvalidArgument(f"{name}: cannot decode the image")))
            else:
                thumbnail = fake_thumbnail(data, thumbnail_px) if thumbnail_px and self.thumbnails else b""
                logits = image_logits(data) if include_logits else None
                out.append(EncodedImage(image_features(data), logits, thumbnail=thumbnail))
        return out


@dataclass
class RankCall:
    features: Matrix
    logits: Matrix | None
    top_k: int
    tag_filter: int
    head: str
    min_version: int


class FakeTagger:
    """Records what the gateway asks it; ranks nothing."""

    def __init__(self, vocabulary_version: int = 1) -> None:
        self.vocabulary_version = vocabulary_version
        self.rank_calls: list[RankCall] = []

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
        self.rank_calls.append(RankCall(features, logits, top_k, tag_filter, head, min_version))
        return RankedTags([], head, 0, max(self.vocabulary_version, min_version))

    async def add_tags(self, tags: Sequence[str], timeout: float) -> tagger_pb2.AddTagsResponse:
        return tagger_pb2.AddTagsResponse()

    async def remove_tags(self, tags: Sequence[str], timeout: float) -> tagger_pb2.RemoveTagsResponse:
        return tagger_pb2.RemoveTagsResponse()

    async def list_tags(
        self, tag_filter: int, page_size: int, page_token: str, min_version: int, timeout: float
    ) -> tagger_pb2.ListTagsResponse:
        return tagger_pb2.ListTagsResponse()


@dataclass
class FakeRecord:
    id: str
    label: int
    visual: Matrix
    semantics: dict[str, Matrix]
    metadata: dict[str, str]
    source_name: str
    feature_norm: float
    top_logits: list[tuple[int, float]]
    created_ms: int
    thumbnail: bytes = b""


@dataclass
class FakeShard:
    """One index shard in memory, following the index contract (protos/imgsearch/index/v1/index.proto)."""

    name: str
    records: dict[str, FakeRecord] = field(default_factory=dict)
    config: HeadConfig = field(default_factory=HeadConfig)
    down: bool = False
    # Raised by every search (e.g. InvalidArgument, to model a query the shard refuses).
    search_error: ImgsearchError | None = None
    # Seconds a search takes (a hung shard): past the caller's budget it answers DEADLINE_EXCEEDED.
    search_delay: float = 0.0
    # While set and not yet released, scan_missing waits on it (holds a backfill part way).
    scan_gate: asyncio.Event | None = None
    # Raised by every scan (a shard that answers GetHeadState but refuses Scan).
    scan_error: ImgsearchError | None = None
    scans: int = 0
    last_write_ms: int = 0
    next_label: int = 0
    refused: list[str] = field(default_factory=list)
    backfilled: dict[str, list[str]] = field(default_factory=dict)
    searches: list[tuple[int, str]] = field(default_factory=list)
    # The query vector of every search, in order.
    queries: list[Matrix] = field(default_factory=list)

    def _check(self) -> None:
        if self.down:
            raise Unavailable(f"shard {self.name} is down")

    def heads_state(self) -> ShardHeads:
        vectors = {h: 0 for h in (self.config.active, self.config.building) if h}
        for r in self.records.values():
            for h in r.semantics:
                vectors[h] = vectors.get(h, 0) + 1
        return ShardHeads(self.name, self.config, len(self.records), vectors, self.last_write_ms)

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
        self._check()
        if self.search_error is not None:
            raise self.search_error
        if self.search_delay:
            await asyncio.sleep(min(self.search_delay, timeout))
            if self.search_delay > timeout:
                raise PeerError(grpc.StatusCode.DEADLINE_EXCEEDED, f"deadline exceeded waiting for {self.name}")
        head = (head or self.config.active) if space == SPACE_SEMANTIC else ""
        self.searches.append((space, head))
        self.queries.append(np.array(query, dtype=np.float32))
        o = options or ShardQuery()

        def allowed(r: FakeRecord) -> bool:
            if any(r.metadata.get(key) not in values for key, values in o.filter):
                return False
            if o.created_after_ms and r.created_ms < o.created_after_ms:
                return False
            return not (o.created_before_ms and r.created_ms >= o.created_before_ms)

        rows = [
            (r, r.visual if space == SPACE_VISUAL else r.semantics[head])
            for r in self.records.values()
            if r.id not in exclude and (space == SPACE_VISUAL or head in r.semantics) and allowed(r)
        ]
        scored = sorted(((float(np.dot(v, query)), r) for r, v in rows), key=lambda t: (-t[0], t[1].id))
        if o.min_score is not None:
            scored = [(sc, r) for sc, r in scored if sc >= o.min_score]
        if o.after is not None:
            after = o.after
            scored = [(sc, r) for sc, r in scored if (-sc, r.id) > (-after.score, after.id)]
        return [Hit(r.id, sc, dict(r.metadata), r.source_name, self.name) for sc, r in scored[:k]]

    async def count(self, timeout: float) -> int:
        self._check()
        return len(self.records)

    async def upsert(self, records: Sequence[NewRecord], timeout: float) -> list[index_pb2.WriteResult]:
        self._check()
        out = []
        for rec in records:
            missing = [h for h in self.config.write_heads if self.config.epoch > 0 and h not in rec.semantics]
            if missing:
                self.refused.append(rec.id)
                err = FailedPrecondition(f"record {rec.id!r} has no vector of head {missing[0]!r}")
                out.append(index_pb2.WriteResult(id=rec.id, error=item_error(err)))
                continue
            old = self.records.get(rec.id)
            self.records[rec.id] = FakeRecord(
                rec.id,
                self.next_label,
                np.array(rec.visual, dtype=np.float32),
                {h: np.array(v, dtype=np.float32) for h, v in rec.semantics.items()},
                dict(rec.metadata),
                rec.source_name,
                rec.feature_norm,
                list(rec.top_logits),
                old.created_ms if old else int(time.time() * 1000),
                rec.thumbnail,
            )
            self.next_label += 1
            out.append(index_pb2.WriteResult(id=rec.id, changed=old is None))
        return out

    async def delete(self, ids: Sequence[str], timeout: float) -> list[index_pb2.WriteResult]:
        self._check()
        return [index_pb2.WriteResult(id=i, changed=self.records.pop(i, None) is not None) for i in ids]

    async def get(
        self, ids: Sequence[str], include_vectors: bool, timeout: float, include_thumbnails: bool = False
    ) -> tuple[list[StoredRecord], list[str]]:
        self._check()
        found = [
            StoredRecord(
                r.id,
                dict(r.metadata),
                r.source_name,
                r.created_ms,
                self.name,
                r.visual if include_vectors else None,
                dict(r.semantics) if include_vectors else {},
                r.thumbnail if include_thumbnails else b"",
            )
            for i in ids
            if (r := self.records.get(i)) is not None
        ]
        return found, [i for i in ids if i not in self.records]

    async def head_state(self, timeout: float) -> ShardHeads:
        self._check()
        return self.heads_state()

    async def set_head_config(self, config: HeadConfig, timeout: float) -> ShardHeads:
        self._check()
        if config.epoch > self.config.epoch:
            self.config = config
        return self.heads_state()

    async def scan_missing(
        self, head: str, page_size: int, page_token: str, timeout: float
    ) -> tuple[list[StoredSignals], str]:
        self._check()
        self.scans += 1
        if self.scan_error is not None:
            raise self.scan_error
        if not 0 <= page_size <= SCAN_MAX_PAGE:
            raise InvalidArgument(f"page_size must be between 1 and {SCAN_MAX_PAGE}, got {page_size}")
        page_size = page_size or 100
        if self.scan_gate is not None:
            await self.scan_gate.wait()
            self._check()
        after = int(page_token) if page_token else -1
        todo = sorted(
            (r for r in self.records.values() if r.label > after and head not in r.semantics), key=lambda r: r.label
        )
        page = todo[:page_size]
        token = str(page[-1].label) if len(todo) > page_size else ""
        return [StoredSignals(r.id, r.visual, r.feature_norm, list(r.top_logits)) for r in page], token

    async def set_semantic(self, head: str, updates: Sequence[tuple[str, Matrix]], timeout: float) -> int:
        self._check()
        applied = 0
        for image_id, vector in updates:
            rec = self.records.get(image_id)
            if rec is None:
                continue
            rec.semantics[head] = np.array(vector, dtype=np.float32)
            self.backfilled.setdefault(head, []).append(image_id)
            applied += 1
        self.last_write_ms = int(time.time() * 1000)
        return applied


def make_info() -> ModelInfo:
    return ModelInfo(
        image_model="efficientnet-lite0",
        image_model_version=IMAGE_MODEL_VERSION,
        image_size=224,
        feature_dim=FEATURE_DIM,
        class_labels=tuple(f"class {i}" for i in range(CLASSES)),
        text_model="all-MiniLM-L6-v2",
        text_model_version="all-MiniLM-L6-v2@0123456789ab",
        text_dim=TEXT_DIM,
        providers=("CPUExecutionProvider",),
    )


def write_linear_head(
    heads_dir: Path,
    name: str,
    seed: int,
    conse_weight: float = 0.0,
    feature_norm: str = "l2",
    bias: float = 0.0,
    version: str = "1",
    stem: str | None = None,
) -> str:
    """A linear head file `<stem or name>.npz` (optionally blended with ConSE); returns its id name@version."""
    rng = np.random.default_rng(seed)
    save_head(
        heads_dir / f"{stem or name}.npz",
        {
            "name": name,
            "version": version,
            "kind": "linear",
            "image_model": IMAGE_MODEL_VERSION,
            "feature_dim": FEATURE_DIM,
            "text_dim": TEXT_DIM,
            "feature_norm": feature_norm,
            "conse_weight": conse_weight,
            "image_layers": [{"weight": "w", "bias": "b", "activation": "none"}],
        },
        {
            "w": rng.standard_normal((FEATURE_DIM, TEXT_DIM)).astype(np.float32),
            "b": (bias * rng.standard_normal(TEXT_DIM)).astype(np.float32),
        },
    )
    return f"{name}@{version}"


def make_catalog(heads_dir: Path) -> HeadCatalog:
    """A real catalog: ConSE over random class embeddings, lin-a (linear) and lin-b (blended with ConSE).

    lin-b works on raw (not normalised) features with a bias, so its output depends on the feature norm: a
    re-projection must restore the raw features from the stored unit vector and norm to reproduce it.
    """
    write_linear_head(heads_dir, "lin-a", seed=1)
    write_linear_head(heads_dir, "lin-b", seed=2, conse_weight=0.4, feature_norm="none", bias=20.0)
    rng = np.random.default_rng(3)
    classes = rng.standard_normal((CLASSES, TEXT_DIM)).astype(np.float32)
    classes /= np.linalg.norm(classes, axis=1, keepdims=True)
    return HeadCatalog.load(make_info(), classes, heads_dir)


def make_settings(heads_dir: Path, shards: Sequence[FakeShard], **overrides: object) -> GatewaySettings:
    values: dict[str, object] = {
        "encoder_address": "encoder:1",
        "tagger_address": "tagger:1",
        "index_shards": ",".join(f"{s.name}=index:{i + 1}" for i, s in enumerate(shards)),
        "heads_dir": heads_dir,
        "default_head": "lin-a",
        "head_refresh_seconds": 0.02,
        "peer_timeout_seconds": 2.0,
        "add_batch_size": 4,
    }
    values.update(overrides)
    return GatewaySettings(**values)  # type: ignore[arg-type]


async def stream(images: Sequence[NewImage]) -> AsyncIterator[NewImage]:
    for image in images:
        yield image


def brute_force(
    shards: Sequence[FakeShard], space: int, query: Matrix, k: int, head: str = "", exclude: Sequence[str] = ()
) -> list[tuple[str, float]]:
    """Top k (id, score) by inner product over every record the given shards hold, in numpy."""
    ids: list[str] = []
    rows: list[Matrix] = []
    for shard in shards:
        for r in shard.records.values():
            if r.id in exclude:
                continue
            v = r.visual if space == SPACE_VISUAL else r.semantics.get(head)
            if v is not None:
                ids.append(r.id)
                rows.append(v)
    if not rows:
        return []
    scores = np.stack(rows).astype(np.float64) @ query.astype(np.float64)
    order = np.argsort(-scores, kind="stable")[:k]
    return [(ids[i], float(scores[i])) for i in order]


async def wait_for(predicate: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    """Poll a zero-argument callable until it returns true (yielding to the event loop in between)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


async def close_gateway(gw: Gateway, timeout: float = 5.0) -> bool:
    """Close a gateway; returns False when close() did not finish in time (then cancels it again to clean up)."""
    task = asyncio.create_task(gw.close())
    done, _ = await asyncio.wait([task], timeout=timeout)
    if not done:
        # Cancelling close() cancels the reconciler task it awaits once more, which then ends.
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    return bool(done)


def status_code(exc: ImgsearchError | None) -> grpc.StatusCode | None:
    return None if exc is None else exc.code
