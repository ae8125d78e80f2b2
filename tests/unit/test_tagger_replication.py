"""Tagger writer and read replica against an in-memory text source and change feed: versions, chunking, RPCs."""

from __future__ import annotations

import asyncio
import time
import zlib
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from pydantic import ValidationError

from imgsearch.api.tagger.v1 import tagger_pb2
from imgsearch.heads import HeadCatalog, l2_normalise
from imgsearch.kit.convert import Matrix, to_vector
from imgsearch.kit.errors import FailedPrecondition, ImgsearchError, InvalidArgument, ResourceExhausted, Unavailable
from imgsearch.models.manifest import ModelInfo
from imgsearch.tagger import convert, core
from imgsearch.tagger.core import READ_REPLICA, VocabularyWriter, VocabUpdate
from imgsearch.tagger.replica import ReadReplica
from imgsearch.tagger.servicer import MOVED, TaggerServicer
from imgsearch.tagger.settings import TaggerSettings
from imgsearch.tagger.store import StoredTag

CLASSES = tuple(f"class {i}" for i in range(12))
INFO = ModelInfo(
    image_model="fake-cnn",
    image_model_version="fake-cnn@1",
    image_size=224,
    feature_dim=8,
    class_labels=CLASSES,
    text_model="fake-text",
    text_model_version="fake-text@1",
    text_dim=16,
    providers=(),
)


class FakeText:
    """An encoder stand-in: deterministic embeddings, the real per-call limit, scriptable failures."""

    limit = 256

    def __init__(self) -> None:
        self.calls: list[int] = []
        self.fail_calls: set[int] = set()  # call numbers (0-based) that fail as a whole

    async def model_info(self, timeout: float) -> ModelInfo:
        return INFO

    async def encode_texts(self, texts: Sequence[str], timeout: float) -> list[Matrix | ImgsearchError]:
        if len(texts) > self.limit:
            raise ResourceExhausted(f"{len(texts)} texts in one request; the limit is {self.limit}")
        n = len(self.calls)
        self.calls.append(len(texts))
        if n in self.fail_calls:
            raise Unavailable("encoder at fake is unavailable")
        out: list[Matrix | ImgsearchError] = []
        for text in texts:
            if "poison" in text:
                out.append(InvalidArgument(f"text {text!r} cannot be embedded"))
            else:
                rng = np.random.default_rng(zlib.crc32(text.encode()))
                out.append(l2_normalise(rng.standard_normal(INFO.text_dim).astype(np.float32)))
        return out


class Link:
    """The writer's change feed in memory; cut() drops every open stream like a killed writer would."""

    def __init__(self, writer: VocabularyWriter | None) -> None:
        self.writer = writer
        self.connects = 0
        self._pipes: list[tuple[asyncio.Queue[VocabUpdate | None], asyncio.Task[None]]] = []

    def cut(self) -> None:
        self.writer = None
        for pipe, pump in self._pipes:
            pump.cancel()
            pipe.put_nowait(None)
        self._pipes.clear()

    def restore(self, writer: VocabularyWriter) -> None:
        self.writer = writer

    async def watch(self) -> AsyncIterator[VocabUpdate]:
        self.connects += 1
        writer = self.writer
        if writer is None:
            raise Unavailable("vocabulary writer at fake is unavailable: connection refused")
        pipe: asyncio.Queue[VocabUpdate | None] = asyncio.Queue()

        async def pump() -> None:
            async for update in writer.watch():
                pipe.put_nowait(update)

        task = asyncio.create_task(pump())
        # However the writer's stream ends, the reader sees the connection drop.
        task.add_done_callback(lambda _: pipe.put_nowait(None))
        self._pipes.append((pipe, task))
        try:
            while (update := await pipe.get()) is not None:
                yield update
            raise Unavailable("vocabulary writer at fake is unavailable: connection reset")
        finally:
            task.cancel()


def settings(tmp: Path, **kw: Any) -> TaggerSettings:
    return TaggerSettings(
        encoder_address="fake",
        data_dir=tmp / "tagger",
        heads_dir=tmp / "heads",
        version_wait_seconds=0.3,
        **kw,
    )


def image(rng: np.random.Generator) -> tuple[Matrix, Matrix]:
    return rng.standard_normal(INFO.feature_dim).astype(np.float32), rng.standard_normal(len(CLASSES)).astype(
        np.float32
    )


async def started_writer(tmp: Path, text: FakeText | None = None) -> VocabularyWriter:
    w = VocabularyWriter(settings(tmp), text or FakeText())
    await w.start()
    return w


async def eventually(check: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


async def test_add_of_1000_tags_embeds_in_encoder_sized_chunks_and_failures_stay_alone(tmp_path: Path) -> None:
    text = FakeText()
    w = await started_writer(tmp_path, text)
    try:
        before, version = w.vocabulary.size, w.vocabulary.version
        text.calls.clear()
        tags = [f"poison tag {i}" if i in (5, 600, 999) else f"new tag {i}" for i in range(1000)]
        changes = await w.add_tags(tags)
        assert text.calls == [256, 256, 256, 232], "within the encoder's per-call limit"
        errors = {r.tag: r.error for r in changes.results if r.error is not None}
        assert set(errors) == {"poison tag 5", "poison tag 600", "poison tag 999"}
        assert all(isinstance(e, InvalidArgument) for e in errors.values())
        assert sum(r.changed for r in changes.results) == 997
        assert w.vocabulary.size == before + 997
        assert changes.version == version + 1, "one call, one version"

        # A chunk whose encoder call fails fails its own tags only.
        text.calls.clear()
        text.fail_calls = {1}
        changes = await w.add_tags([f"more {i}" for i in range(600)])
        failed = [r for r in changes.results if r.error is not None]
        assert len(failed) == 256 and all(r.error and r.error.code == grpc.StatusCode.UNAVAILABLE for r in failed)
        assert sum(r.changed for r in changes.results) == 600 - 256
        # Nothing embeddable at all: the call itself fails UNAVAILABLE, so callers retry it.
        text.calls.clear()
        text.fail_calls = {0}
        with pytest.raises(Unavailable):
            await w.add_tags(["lonely"])
    finally:
        await w.close()


async def test_a_starting_tagger_answers_unavailable(tmp_path: Path) -> None:
    w = VocabularyWriter(settings(tmp_path), FakeText())
    features, logits = image(np.random.default_rng(0))
    with pytest.raises(Unavailable, match="still starting"):
        w.rank(features, logits, 5, "all")
    with pytest.raises(Unavailable):
        w.list_tags("all", 10, "")
    with pytest.raises(Unavailable):
        await w.add_tags(["x"])
    servicer = TaggerServicer(w)
    request = tagger_pb2.RankTagsRequest(
        image=tagger_pb2.ImageSignal(features=to_vector(features), logits=to_vector(logits)), top_k=3
    )
    with pytest.raises(Unavailable):
        await servicer.RankTags(request, None)  # type: ignore[arg-type]
    await w.close()


async def test_deprecated_rpcs_point_to_the_gateway_and_ranking_takes_a_head(tmp_path: Path) -> None:
    w = await started_writer(tmp_path)
    servicer = TaggerServicer(w)
    # The servicer never touches its context on these paths.
    ctx: Any = None
    try:
        calls: list[tuple[Any, Any]] = [
            (servicer.ProjectImages, tagger_pb2.ProjectImagesRequest()),
            (servicer.ProjectTexts, tagger_pb2.ProjectTextsRequest()),
            (servicer.ActivateHead, tagger_pb2.ActivateHeadRequest(head="conse")),
        ]
        for call, request in calls:
            with pytest.raises(ImgsearchError) as err:
                await call(request, ctx)
            assert err.value.code == grpc.StatusCode.UNIMPLEMENTED
            assert err.value.message == MOVED
        methods = tagger_pb2.DESCRIPTOR.services_by_name["TaggerService"].methods_by_name
        for name in ("ProjectImages", "ProjectTexts", "ActivateHead", "ListHeads"):
            assert methods[name].GetOptions().deprecated, name
        assert not methods["RankTags"].GetOptions().deprecated

        heads = await servicer.ListHeads(tagger_pb2.ListHeadsRequest(), ctx)
        assert heads.active == "conse@1" and [h.active for h in heads.heads] == [True]

        added = await servicer.AddTags(tagger_pb2.AddTagsRequest(tags=["sunset"]), ctx)
        features, logits = image(np.random.default_rng(1))
        signal = tagger_pb2.ImageSignal(features=to_vector(features), logits=to_vector(logits))
        ranked = await servicer.RankTags(
            tagger_pb2.RankTagsRequest(image=signal, top_k=100_000, head="conse", min_vocabulary_version=1),
            ctx,
        )
        assert ranked.head == "conse@1" and ranked.vocabulary_version == added.vocabulary_version
        assert len(ranked.tags) == ranked.vocabulary_size == w.vocabulary.size, "top_k beyond the size: everything"
        with pytest.raises(ImgsearchError) as err:
            await servicer.RankTags(tagger_pb2.RankTagsRequest(image=signal, top_k=3, head="nope"), ctx)
        assert err.value.code == grpc.StatusCode.NOT_FOUND and "available: conse@1" in err.value.message
        listed = await servicer.ListTags(tagger_pb2.ListTagsRequest(page_size=5), ctx)
        assert listed.vocabulary_version == added.vocabulary_version
    finally:
        await w.close()


async def test_updates_survive_the_wire_format() -> None:
    rng = np.random.default_rng(2)
    tags = [
        StoredTag(f"k{i}", f"K{i}", i % 2 == 0, 1000 + i, "fake-text@1", rng.random(16, dtype=np.float32))
        for i in range(3)
    ]
    update = VocabUpdate(7, "fake-text@1", 16, added=tags, removed=["gone"], reset=True, complete=False)
    back = convert.vocab_update(convert.vocab_update_message(update))
    assert (back.version, back.reset, back.complete, list(back.removed)) == (7, True, False, ["gone"])
    for a, b in zip(tags, back.added, strict=True):
        assert (a.key, a.name, a.seen, a.added_ms, a.text_model) == (b.key, b.name, b.seen, b.added_ms, b.text_model)
        np.testing.assert_array_equal(a.embedding, b.embedding)
    message = convert.vocab_update_message(update)
    message.added[0].embedding = message.added[0].embedding[:-4]
    with pytest.raises(FailedPrecondition, match="embedding bytes"):
        convert.vocab_update(message)


async def test_replica_follows_the_writer_across_a_writer_restart(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Small parts, so the first snapshot spans several messages and must be staged until complete.
    monkeypatch.setattr(core, "SNAPSHOT_CHUNK", 100)
    text = FakeText()
    w = await started_writer(tmp_path, text)
    link = Link(w)
    r = ReadReplica(settings(tmp_path / "replica", role="reader", writer_address="fake"), text, link)
    features, logits = image(np.random.default_rng(3))
    with pytest.raises(Unavailable):
        r.rank(features, logits, 5, "all")
    await r.start()
    try:
        assert r.vocabulary.version == w.vocabulary.version and r.vocabulary.keys == w.vocabulary.keys
        np.testing.assert_array_equal(r.vocabulary.raw, w.vocabulary.raw)
        assert r.vocabulary.size > core.SNAPSHOT_CHUNK

        added = await w.add_tags(["zebra crossing", "Harbour lights"])
        removed = await w.remove_tags(["class 3"])
        vocab = await r.wait_for_version(removed.version)
        assert vocab.version == removed.version == added.version + 1
        assert "zebra crossing" in vocab.keys and "class 3" not in vocab.keys
        assert vocab.keys == w.vocabulary.keys
        on_writer = w.rank(features, logits, 10_000, "all")
        on_replica = r.rank(features, logits, 10_000, "all", vocab=vocab)
        assert [t.tag for t in on_replica.tags] == [t.tag for t in on_writer.tags]
        assert [t.score for t in on_replica.tags] == pytest.approx([t.score for t in on_writer.tags], abs=1e-6)

        with pytest.raises(FailedPrecondition, match=READ_REPLICA):
            await r.add_tags(["nope"])
        with pytest.raises(FailedPrecondition, match=READ_REPLICA):
            await r.remove_tags(["zebra crossing"])
        start = time.monotonic()
        behind = await r.wait_for_version(removed.version + 10)
        assert behind.version == removed.version and 0.25 < time.monotonic() - start < 2.0

        # The writer dies: the replica keeps answering from its last snapshot.
        link.cut()
        await w.close()
        await asyncio.sleep(0.3)
        still = r.rank(features, logits, 5, "unseen")
        assert still.vocabulary_version == removed.version and {t.tag for t in still.tags} == {
            "zebra crossing",
            "Harbour lights",
        }

        # It comes back on the same data: same durable version, and the replica catches up.
        w2 = await started_writer(tmp_path, text)
        try:
            assert w2.vocabulary.version == removed.version
            later = await w2.add_tags(["after the restart"])
            link.restore(w2)
            await eventually(lambda: r.vocabulary.version >= later.version)
            assert "after the restart" in r.vocabulary.keys and r.snapshots == 2
            assert link.connects >= 3, "reconnected after failed attempts"
        finally:
            await w2.close()
    finally:
        await r.close()


async def test_replica_refuses_tags_of_another_text_model(tmp_path: Path) -> None:
    r = ReadReplica(settings(tmp_path, role="reader", writer_address="fake"), FakeText(), Link(None))
    r._set_catalog(await _catalog(tmp_path))
    with pytest.raises(FailedPrecondition, match="same encoder models"):
        await r.receive(VocabUpdate(1, "other-text@9", 16, reset=True))


async def _catalog(tmp: Path) -> HeadCatalog:
    text = FakeText()
    emb = np.stack([await _one(text, c) for c in CLASSES])
    return HeadCatalog.load(INFO, emb, tmp / "heads")


async def _one(text: FakeText, t: str) -> Matrix:
    [e] = await text.encode_texts([t], 1)
    assert not isinstance(e, ImgsearchError)
    return e


async def test_a_watcher_that_falls_behind_is_dropped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(core, "WATCH_QUEUE", 2)
    w = await started_writer(tmp_path)
    try:
        stream = w.watch()
        first = await anext(stream)
        assert first.reset and first.complete and first.version == w.vocabulary.version
        for i in range(3):
            await w.add_tags([f"burst {i}"])
        with pytest.raises(Unavailable, match="fell more than 2 changes behind"):
            await anext(stream)
        # A new watcher starts over from a snapshot that has everything.
        fresh = await anext(w.watch())
        assert fresh.reset and {"burst 0", "burst 2"} <= {t.key for t in fresh.added}
    finally:
        await w.close()


def test_a_reader_needs_the_writer_address() -> None:
    with pytest.raises(ValidationError, match="writer's host:port"):
        TaggerSettings(encoder_address="e:1", role="reader")  # type: ignore[call-arg]
    assert TaggerSettings(encoder_address="e:1", role="reader", writer_address="w:2").role == "reader"  # type: ignore[call-arg]
    assert TaggerSettings(encoder_address="e:1").role == "writer"  # type: ignore[call-arg]


async def test_an_idle_feed_sends_heartbeats_that_replicas_skip(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(core, "WATCH_HEARTBEAT_SECONDS", 0.05)
    text = FakeText()
    w = await started_writer(tmp_path, text)
    r = ReadReplica(settings(tmp_path / "replica", role="reader", writer_address="fake"), text, Link(w))
    try:
        stream = w.watch()
        assert (await anext(stream)).reset
        beat = await anext(stream)
        assert (beat.version, beat.added, beat.removed, beat.reset) == (w.vocabulary.version, (), (), False)
        await stream.aclose()
        await r.start()
        held = r.vocabulary
        await asyncio.sleep(0.3)
        assert r.vocabulary is held, "a heartbeat does not copy the snapshot"
    finally:
        await r.close()
        await w.close()
