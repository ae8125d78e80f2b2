"""Read replica: ranks and lists an in-memory copy of the writer's vocabulary, kept current by its change feed."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import AsyncIterator
from typing import Protocol

import grpc
from grpc import aio

from imgsearch.api.tagger.v1 import tagger_pb2, tagger_pb2_grpc
from imgsearch.heads import HeadCatalog, TextSource
from imgsearch.kit.errors import FailedPrecondition, ImgsearchError, Unavailable
from imgsearch.kit.peers import peer_error
from imgsearch.tagger import convert, metrics
from imgsearch.tagger.core import Tagger, Vocabulary, VocabUpdate, apply_change, build_vocabulary
from imgsearch.tagger.settings import TaggerSettings
from imgsearch.tagger.store import StoredTag

log = logging.getLogger(__name__)

# Reconnect backoff: fast after a blip, capped so a long writer outage costs little.
FIRST_RETRY_SECONDS = 0.2
MAX_RETRY_SECONDS = 5.0


class WatchSource(Protocol):
    """What a replica needs from the writer: its vocabulary stream (snapshot, then changes)."""

    def watch(self) -> AsyncIterator[VocabUpdate]: ...


class WriterClient:
    """WatchVocabulary on the writer over gRPC, as domain updates; failures become ImgsearchError."""

    def __init__(self, channel: aio.Channel, address: str, replica: str) -> None:
        self.stub = tagger_pb2_grpc.TaggerServiceStub(channel)
        self.address = address
        self.replica = replica

    async def watch(self) -> AsyncIterator[VocabUpdate]:
        call = self.stub.WatchVocabulary(tagger_pb2.WatchVocabularyRequest(replica=self.replica))
        try:
            async for message in call:
                yield convert.vocab_update(message)
        except grpc.RpcError as exc:
            raise peer_error(exc, f"vocabulary writer at {self.address}") from None
        finally:
            call.cancel()


class ReadReplica(Tagger):
    """A tagger that serves RankTags/ListTags from memory and follows the single writer.

    Why this design: the vocabulary is small enough to hold in memory (at most max_vocabulary rows of
    text embeddings) and changes rarely, while ranking is hot and must survive a writer restart. So the
    writer stays the only owner of durable state (one SQLite file, no replicated database, no consensus)
    and each replica holds a full copy that it keeps current from one ordered stream:

    - The stream starts with a full snapshot and then carries every committed change in commit order, so
      applying it in order reproduces the writer's state exactly; each message names the writer's durable
      version, which gives callers read-your-writes (min_vocabulary_version) without any coordination.
    - On any disconnect (writer restart or crash, a stream dropped for falling behind, connection ageing)
      the replica keeps serving its last snapshot, reconnects with backoff and starts over from a fresh
      snapshot: no resume tokens or change log to keep, and no way to apply a change twice or miss one.
      A snapshot is staged aside and swapped in only when complete, so readers never see a partial one,
      and it replaces whatever the replica held even at a lower version (a writer restored from backup).
    - Changes are additive and rare, so a replica that is briefly stale ranks slightly old tags rather
      than failing, which is what tagging should do while the writer restarts.

    The replica has no SQLite of its own; its head catalog's class-name embeddings come from the encoder.
    """

    role = "reader"

    def __init__(self, settings: TaggerSettings, source: TextSource, writer: WatchSource) -> None:
        super().__init__(settings, source)
        self.writer = writer
        self._first = asyncio.Event()
        self._staging: list[StoredTag] | None = None
        self._task: asyncio.Task[None] | None = None
        self.snapshots = 0

    async def start(self) -> None:
        """Load the heads (via the encoder), then stay NOT_SERVING until the writer's first snapshot arrives."""
        s = self.settings
        catalog = await HeadCatalog.from_encoder(
            self.source,
            s.heads_dir,
            timeout=s.peer_timeout_seconds,
            startup_timeout=s.startup_timeout_seconds,
            conse_top_t=s.conse_top_t,
            anchor_penalty=s.anchor_penalty,
        )
        self._set_catalog(catalog)
        self._task = asyncio.create_task(self._follow(), name="follow-writer")
        try:
            await asyncio.wait_for(self._first.wait(), s.startup_timeout_seconds)
        except TimeoutError:
            raise Unavailable(
                f"no vocabulary snapshot from the writer ({s.writer_address}) within {s.startup_timeout_seconds}s"
            ) from None
        log.info("replica ready", extra={"role": self.role, "version": self.vocabulary.version})

    async def _follow(self) -> None:
        """Follow the writer forever: on any failure keep the last snapshot, back off, start over."""
        delay = FIRST_RETRY_SECONDS
        while True:
            try:
                async for update in self.writer.watch():
                    if await self.receive(update):
                        delay = FIRST_RETRY_SECONDS
                        metrics.REPLICA_CONNECTED.set(1)
                reason = "the writer ended the stream"
            except ImgsearchError as exc:
                reason = exc.message
            except Exception as exc:  # a bug must not stop the replica from retrying
                log.exception("unexpected error following the writer")
                reason = repr(exc)
            self._staging = None
            metrics.REPLICA_CONNECTED.set(0)
            held = None if self._vocab is None else self._vocab.version
            log.warning(
                "lost the writer; serving the last snapshot and reconnecting",
                extra={"reason": reason, "version": held, "retry_seconds": round(delay, 2)},
            )
            # Jitter: replicas that lost one writer together do not all ask for snapshots at once.
            await asyncio.sleep(delay * random.uniform(0.5, 1.0))
            delay = min(delay * 2, MAX_RETRY_SECONDS)

    async def receive(self, update: VocabUpdate) -> bool:
        """Apply one stream message; True when it completed a snapshot."""
        if update.reset:
            info = self.catalog.info
            if update.text_model != info.text_model_version or update.dim != info.text_dim:
                # Tags embedded by another text model cannot be ranked against this encoder's class anchors.
                raise FailedPrecondition(
                    f"the writer's tags are embedded with {update.text_model!r} ({update.dim}-d) but this "
                    f"replica's encoder serves {info.text_model_version!r} ({info.text_dim}-d); point both at "
                    "the same encoder models"
                )
            self._staging = list(update.added)
        elif self._staging is not None:
            self._staging.extend(update.added)
        else:
            if self._vocab is None:
                raise Unavailable("the writer sent a change before any snapshot")
            vocab = self._vocab
            if not update.added and not update.removed:
                return False  # a heartbeat: nothing to copy
            self._publish(apply_change(vocab, update, self._views_of(vocab)))
            return False
        if not update.complete:
            return False
        tags, self._staging = self._staging, None
        assert tags is not None  # a complete message always follows (or is) a reset
        vocab = await asyncio.to_thread(self._build, tags, update)
        self._publish(vocab)
        self.snapshots += 1
        self._first.set()
        log.info("vocabulary snapshot applied", extra={"version": vocab.version, "tags": vocab.size})
        return True

    def _build(self, tags: list[StoredTag], update: VocabUpdate) -> Vocabulary:
        return self._warm(build_vocabulary(tags, update.version, update.text_model, update.dim))

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
