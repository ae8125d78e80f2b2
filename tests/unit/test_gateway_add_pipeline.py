"""The gateway's add pipeline over in-memory peers: overlap, bounds, partial batches, order, failures, thumbnails."""

from __future__ import annotations

import asyncio
import contextlib
import io
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import pytest
from PIL import Image

from imgsearch.gateway import core
from imgsearch.gateway.core import Gateway, NewImage
from imgsearch.gateway.thumbnails import make_thumbnail
from imgsearch.kit.encoder_client import EncodedImage
from imgsearch.kit.errors import Unavailable
from tests.fakes import (
    SPACE_SEMANTIC,
    SPACE_VISUAL,
    FakeEncoder,
    FakeShard,
    FakeTagger,
    close_gateway,
    fake_thumbnail,
    make_catalog,
    make_settings,
    stream,
)

TIMEOUT = 5.0
BATCH = 4  # make_settings' add_batch_size


class SlowEncoder(FakeEncoder):
    """FakeEncoder that takes `delay(call number)` seconds per call and records how many calls overlap."""

    def __init__(self, *args: object, delay: float = 0.05, fail_call: int | None = None) -> None:
        super().__init__(*args)  # type: ignore[arg-type]
        self.delay = delay
        self.fail_call = fail_call
        self.calls = 0
        self.active = 0
        self.most_active = 0
        self.gate: asyncio.Event | None = None

    async def encode_images(
        self, images: Sequence[tuple[bytes, str]], include_logits: bool, timeout: float, thumbnail_px: int = 0
    ) -> list[EncodedImage]:
        call = self.calls
        self.calls += 1
        self.active += 1
        self.most_active = max(self.most_active, self.active)
        try:
            if self.gate is not None:
                await self.gate.wait()
            # Later calls finish first when delay shrinks: the writes must still land in stream order.
            await asyncio.sleep(self.delay / (call + 1))
            if call == self.fail_call:
                raise Unavailable("the encoder: connection refused")
            return await super().encode_images(images, include_logits, timeout, thumbnail_px)
        finally:
            self.active -= 1


@pytest.fixture()
async def parts(tmp_path: Path) -> AsyncIterator[tuple[Gateway, SlowEncoder, list[FakeShard]]]:
    catalog = make_catalog(tmp_path)
    shards = [FakeShard(f"index-{i}") for i in range(2)]
    encoder = SlowEncoder(catalog.info)
    gw = Gateway(make_settings(tmp_path, shards), encoder, FakeTagger(), shards)
    await gw.start(catalog=catalog)
    try:
        yield gw, encoder, shards
    finally:
        assert await close_gateway(gw)


def pipeline_tasks() -> list[asyncio.Task[object]]:
    """Tasks of add pipelines still alive (receiver, batcher, batches)."""
    return [t for t in asyncio.all_tasks() if "_AddPipeline" in getattr(t.get_coro(), "__qualname__", "")]


def image(i: int, image_id: str | None = None, **metadata: str) -> NewImage:
    return NewImage(image_id or f"img-{i}", f"bytes of image {i}".encode(), dict(metadata), f"{i}.jpg")


async def test_batches_are_encoded_concurrently_and_every_image_gets_one_result(
    parts: tuple[Gateway, SlowEncoder, list[FakeShard]],
) -> None:
    gw, encoder, shards = parts
    n = 8 * BATCH + 3
    results = await gw.add_images(stream([image(i) for i in range(n)]), lambda: TIMEOUT)
    assert [r.position for r in results] == list(range(n)) and all(r.error is None for r in results)
    assert 2 <= encoder.most_active <= core.ADD_PIPELINE_DEPTH
    assert sum(len(s.records) for s in shards) == n


async def test_a_fast_sender_is_held_back_while_the_pipeline_is_full(
    parts: tuple[Gateway, SlowEncoder, list[FakeShard]],
) -> None:
    gw, encoder, _ = parts
    encoder.gate = asyncio.Event()  # the encoder answers nothing until released
    pulled = 0

    async def endless() -> AsyncIterator[NewImage]:
        nonlocal pulled
        for i in range(10_000):
            pulled += 1
            yield image(i)

    async def consume() -> int:
        count = 0
        async with contextlib.aclosing(gw.add_images_stream(endless(), lambda: TIMEOUT)) as results:
            async for done in results:
                count += len(done)
                if count >= 2 * BATCH:
                    break  # closing the stream early stops the call and its batches
        return count

    task = asyncio.create_task(consume())
    await asyncio.sleep(0.3)
    # DEPTH batches taken, plus at most one batch (and one image) waiting to be cut into the next.
    assert pulled <= (core.ADD_PIPELINE_DEPTH + 1) * BATCH + 1, pulled
    assert encoder.active == core.ADD_PIPELINE_DEPTH
    encoder.gate.set()
    assert await asyncio.wait_for(task, 10) >= 2 * BATCH
    await asyncio.sleep(0.05)
    assert not pipeline_tasks()


async def test_large_images_close_batches_by_bytes_and_hold_the_sender_back_by_bytes(
    parts: tuple[Gateway, SlowEncoder, list[FakeShard]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Images of a third of ADD_BATCH_MAX_BYTES: batches of 3 (not add_batch_size 4), and the receiver stops
    reading once a batch's worth of bytes waits, so the call holds the depth's batches plus about one more."""
    gw, encoder, _ = parts
    monkeypatch.setattr(core, "ADD_BATCH_MAX_BYTES", 3000)
    encoder.gate = asyncio.Event()
    pulled = 0
    sizes: list[int] = []
    plain_encode = FakeEncoder.encode_images

    async def recording(self: FakeEncoder, images: Sequence[tuple[bytes, str]], *args: object) -> list[EncodedImage]:
        sizes.append(len(images))
        return await plain_encode(self, images, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(FakeEncoder, "encode_images", recording)

    async def endless() -> AsyncIterator[NewImage]:
        nonlocal pulled
        for i in range(10_000):
            pulled += 1
            yield NewImage(f"big-{i}", bytes([i % 256]) * 1000, {}, f"{i}.jpg")

    async def consume() -> int:
        count = 0
        async with contextlib.aclosing(gw.add_images_stream(endless(), lambda: TIMEOUT)) as results:
            async for done in results:
                count += len(done)
                if count >= 12:
                    break
        return count

    task = asyncio.create_task(consume())
    await asyncio.sleep(0.3)
    # DEPTH batches of 3 taken, 3 images' worth of bytes waiting, and the one the receiver holds.
    assert pulled <= (core.ADD_PIPELINE_DEPTH + 1) * 3 + 1, pulled
    assert encoder.active == core.ADD_PIPELINE_DEPTH
    encoder.gate.set()
    assert await asyncio.wait_for(task, 10) >= 12
    assert sizes and max(sizes) == 3
    await asyncio.sleep(0.05)
    assert not pipeline_tasks()


async def test_a_pausing_sender_gets_its_partial_batch_stored_without_waiting_for_more(
    parts: tuple[Gateway, SlowEncoder, list[FakeShard]],
) -> None:
    gw, _, _ = parts
    stored = asyncio.Event()

    async def pausing() -> AsyncIterator[NewImage]:
        for i in range(BATCH - 1):
            yield image(i)
        # Less than a batch sent: the sender waits for those results before sending the rest.
        await asyncio.wait_for(stored.wait(), 5)
        yield image(BATCH)

    batches = []
    async for done in gw.add_images_stream(pausing(), lambda: TIMEOUT):
        batches.append(sorted(r.position for r in done))
        stored.set()
    assert batches == [[0, 1, 2], [3]]


async def test_batches_are_written_in_stream_order_even_when_a_later_one_encodes_first(
    parts: tuple[Gateway, SlowEncoder, list[FakeShard]],
) -> None:
    gw, encoder, shards = parts
    encoder.delay = 0.2  # call k sleeps 0.2 / (k + 1): the first batch is the slowest to encode
    images = [image(i) for i in range(3 * BATCH)]
    images[0] = image(0, "same-id", version="first")
    images[-1] = image(99, "same-id", version="last")
    order: list[list[int]] = []
    async for done in gw.add_images_stream(stream(images), lambda: TIMEOUT):
        order.append(sorted(r.position for r in done))
    assert [batch[0] for batch in order] == [0, BATCH, 2 * BATCH]  # results come back in stream order too
    (holder,) = [s for s in shards if "same-id" in s.records]
    assert holder.records["same-id"].metadata == {"version": "last"}


async def test_an_encoder_outage_fails_the_call_and_leaves_no_task_behind(
    parts: tuple[Gateway, SlowEncoder, list[FakeShard]],
) -> None:
    gw, encoder, _ = parts
    encoder.fail_call = 1
    with pytest.raises(Unavailable, match="connection refused"):
        await gw.add_images(stream([image(i) for i in range(6 * BATCH)]), lambda: TIMEOUT)
    await asyncio.sleep(0.05)
    assert not pipeline_tasks()


async def test_a_cancelled_call_cancels_its_batches(parts: tuple[Gateway, SlowEncoder, list[FakeShard]]) -> None:
    gw, encoder, _ = parts
    encoder.gate = asyncio.Event()
    task = asyncio.create_task(gw.add_images(stream([image(i) for i in range(4 * BATCH)]), lambda: TIMEOUT))
    await asyncio.sleep(0.1)
    assert encoder.active > 0
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.sleep(0.05)
    assert encoder.active == 0 and not pipeline_tasks()


def jpeg_of(i: int) -> bytes:
    """A small real JPEG (the gateway's fallback thumbnails need an image it can read)."""
    out = io.BytesIO()
    Image.new("RGB", (320, 240), (40 * i % 256, 90, 160)).save(out, format="JPEG", quality=90)
    return out.getvalue()


def stored_thumbnails(shards: list[FakeShard]) -> dict[str, bytes]:
    return {r.id: r.thumbnail for s in shards for r in s.records.values()}


async def test_thumbnails_come_from_the_encoder_and_the_gateway_decodes_nothing(
    parts: tuple[Gateway, SlowEncoder, list[FakeShard]], monkeypatch: pytest.MonkeyPatch
) -> None:
    gw, encoder, shards = parts

    def no_decoding(data: bytes, size: int, quality: int = 80) -> bytes:
        raise AssertionError("the gateway decoded an image the encoder had made a thumbnail of")

    monkeypatch.setattr(core, "make_thumbnail", no_decoding)
    images = [image(i) for i in range(2 * BATCH + 1)]
    results = await gw.add_images(stream(images), lambda: TIMEOUT)
    assert all(r.error is None for r in results)
    px = gw.settings.thumbnail_px
    assert set(encoder.thumbnail_requests) == {px}
    assert stored_thumbnails(shards) == {im.id: fake_thumbnail(im.data, px) for im in images}


async def test_an_older_encoder_without_thumbnails_gets_them_made_by_the_gateway(tmp_path: Path) -> None:
    catalog = make_catalog(tmp_path)
    shards = [FakeShard(f"index-{i}") for i in range(2)]
    corrupt = jpeg_of(2)
    encoder = FakeEncoder(catalog.info, corrupt={corrupt}, thumbnails=False)
    gw = Gateway(make_settings(tmp_path, shards), encoder, FakeTagger(), shards)
    await gw.start(catalog=catalog)
    try:
        images = [NewImage(f"img-{i}", jpeg_of(i), {}, f"{i}.jpg") for i in range(BATCH + 2)]
        results = await gw.add_images(stream(images), lambda: TIMEOUT)
    finally:
        assert await close_gateway(gw)
    assert [r.error is not None for r in results] == [i == 2 for i in range(len(images))]
    px = gw.settings.thumbnail_px
    thumbnails = stored_thumbnails(shards)
    assert thumbnails == {im.id: make_thumbnail(im.data, px) for im in images if im.data != corrupt}
    with Image.open(io.BytesIO(thumbnails["img-0"])) as im:
        assert im.format == "JPEG" and im.size == (px, px * 3 // 4)


async def test_with_thumbnails_off_none_are_asked_for_or_made(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    catalog = make_catalog(tmp_path)
    shards = [FakeShard("index-0")]
    encoder = FakeEncoder(catalog.info, thumbnails=False)
    gw = Gateway(make_settings(tmp_path, shards, thumbnails=False), encoder, FakeTagger(), shards)
    monkeypatch.setattr(core, "make_thumbnail", lambda *_: pytest.fail("thumbnail made with thumbnails off"))
    await gw.start(catalog=catalog)
    try:
        results = await gw.add_images(stream([image(i) for i in range(BATCH)]), lambda: TIMEOUT)
    finally:
        assert await close_gateway(gw)
    assert all(r.error is None for r in results)
    assert encoder.thumbnail_requests == [0]
    assert set(stored_thumbnails(shards).values()) == {b""}


async def test_searching_and_tagging_by_image_ask_for_no_thumbnail(
    parts: tuple[Gateway, SlowEncoder, list[FakeShard]],
) -> None:
    gw, encoder, _ = parts
    await gw.search_by_image(b"query bytes", 3, SPACE_VISUAL, TIMEOUT)
    await gw.search_by_image(b"query bytes", 3, SPACE_SEMANTIC, TIMEOUT)
    await gw.tag_image(b"query bytes", 3, 0, TIMEOUT)
    assert encoder.thumbnail_requests == [0, 0, 0]
