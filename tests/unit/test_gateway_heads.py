"""Head configuration and the build-then-flip head switch, over in-memory index shards."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from imgsearch.gateway.core import Gateway, NewImage
from imgsearch.gateway.heads import HeadConfig, HeadManager
from imgsearch.heads import HeadCatalog
from imgsearch.kit.errors import InvalidArgument, NotFound, Unavailable
from tests.fakes import (
    SCAN_MAX_PAGE,
    SPACE_SEMANTIC,
    FakeEncoder,
    FakeShard,
    FakeTagger,
    brute_force,
    close_gateway,
    image_features,
    image_logits,
    make_catalog,
    make_settings,
    stream,
    text_embedding,
    wait_for,
)

TIMEOUT = 2.0
A = "lin-a@1"
B = "lin-b@1"


def image(image_id: str, data: bytes | None = None) -> NewImage:
    return NewImage(image_id, data or f"pixels of {image_id}".encode(), {}, f"{image_id}.jpg")


def configs(shards: Sequence[FakeShard]) -> list[HeadConfig]:
    return [s.config for s in shards]


def heads_of(shards: Sequence[FakeShard]) -> dict[str, set[str]]:
    return {r.id: set(r.semantics) for s in shards for r in s.records.values()}


async def add(gw: Gateway, images: Sequence[NewImage]) -> None:
    results = await gw.add_images(stream(images), lambda: TIMEOUT)
    assert [r.error for r in results] == [None] * len(images)


def projection(catalog: HeadCatalog, hid: str, datas: Sequence[bytes]) -> np.ndarray:
    """A fresh projection of images under a head, from the fake encoder's full features and logits."""
    features = np.stack([image_features(d) for d in datas])
    logits = np.stack([image_logits(d) for d in datas])
    return catalog.get(hid).project_images(features, logits)


@dataclass
class Setup:
    shards: list[FakeShard]
    catalog: HeadCatalog
    tmp: Path
    gateways: list[Gateway]

    async def gateway(self, **settings: object) -> Gateway:
        encoder = FakeEncoder(self.catalog.info)
        gw = Gateway(make_settings(self.tmp, self.shards, **settings), encoder, FakeTagger(), self.shards)
        await gw.start(catalog=self.catalog)
        self.gateways.append(gw)
        return gw

    def manager(self, default_head: str = "lin-a") -> HeadManager:
        return HeadManager(self.catalog, self.shards, default_head=default_head, timeout=TIMEOUT)

    def gate(self) -> asyncio.Event:
        """Hold every shard's backfill scan until the returned event is set."""
        event = asyncio.Event()
        for s in self.shards:
            s.scan_gate = event
        return event

    def search_query(self, hid: str, text: str) -> np.ndarray:
        return self.catalog.get(hid).project_texts(text_embedding(text)[None])[0]


@pytest.fixture()
async def setup(tmp_path: Path) -> AsyncIterator[Setup]:
    s = Setup([FakeShard(f"index-{i}") for i in range(3)], make_catalog(tmp_path), tmp_path, [])
    try:
        yield s
    finally:
        # Quiesce first: with every shard down no backfill runs, so no reconciler is woken while it is cancelled
        # (see test_close_right_after_an_activation_stops_the_reconciler).
        for shard in s.shards:
            shard.down = True
            if shard.scan_gate is not None:
                shard.scan_gate.set()
        await asyncio.sleep(0.2)
        closed = [await close_gateway(gw) for gw in s.gateways]
        assert all(closed), "a gateway did not close"


async def test_fresh_cluster_starts_on_the_default_head_or_conse(setup: Setup) -> None:
    manager = setup.manager()
    assert await manager.refresh() == HeadConfig(1, A, "")
    assert configs(setup.shards) == [HeadConfig(1, A, "")] * 3

    for s in setup.shards:
        s.config = HeadConfig()
    fallback = setup.manager(default_head="not-installed")
    conse = f"{setup.catalog.conse.name}@{setup.catalog.conse.version}"
    assert await fallback.refresh() == HeadConfig(1, conse, "")
    assert configs(setup.shards) == [HeadConfig(1, conse, "")] * 3


async def test_equal_epochs_with_different_heads_are_settled_one_epoch_up(setup: Setup) -> None:
    s0, s1, s2 = setup.shards
    s0.config, s1.config, s2.config = HeadConfig(5, A, ""), HeadConfig(5, B, ""), HeadConfig(3, A, B)
    best = max(configs(setup.shards), key=lambda c: (c.epoch, c.active, c.building))
    expected = HeadConfig(best.epoch + 1, best.active, best.building)
    manager = setup.manager()
    assert await manager.refresh() == expected
    assert configs(setup.shards) == [expected] * 3
    assert manager.current() == expected
    # Settled: a second refresh changes nothing.
    assert await manager.refresh() == expected
    assert configs(setup.shards) == [expected] * 3


async def test_refresh_pushes_the_newest_configuration_to_a_shard_that_was_down(setup: Setup) -> None:
    s0, s1, s2 = setup.shards
    for s in setup.shards:
        s.config = HeadConfig(2, A, "")
    s2.down = True
    manager = setup.manager()
    assert await manager.refresh() == HeadConfig(2, A, "")
    assert not manager.states[s2.name].reachable
    # Another gateway moved the reachable shards on meanwhile.
    s0.config = s1.config = HeadConfig(3, A, B)
    assert await manager.refresh() == HeadConfig(3, A, B)
    assert s2.config == HeadConfig(2, A, "")
    s2.down = False
    assert await manager.refresh() == HeadConfig(3, A, B)
    assert configs(setup.shards) == [HeadConfig(3, A, B)] * 3
    assert all(st.reachable for st in manager.states.values())


async def test_activate_refuses_paths_and_unknown_heads(setup: Setup) -> None:
    gw = await setup.gateway()
    before = configs(setup.shards)
    for spec in ("/tmp/lin-b.npz", "heads/lin-b", "lin-b.npz", "..\\lin-b", "  "):
        with pytest.raises(InvalidArgument):
            await gw.activate_head(spec)
    with pytest.raises(NotFound):
        await gw.activate_head("no-such-head")
    assert configs(setup.shards) == before == [HeadConfig(1, A, "")] * 3


async def test_head_switch_builds_then_flips(setup: Setup) -> None:
    # Small backfill pages: each shard's backfill takes several Scan pages.
    gw = await setup.gateway(backfill_page_size=2)
    before = [image(f"old-{i}") for i in range(12)]
    await add(gw, before)
    assert all(s.records for s in setup.shards)
    start = setup.shards[0].config
    release = setup.gate()

    activation = await gw.activate_head("lin-b")
    building = HeadConfig(start.epoch + 1, A, B)
    assert activation.previous == A and activation.failed_shards == []
    assert f"{activation.head.name}@{activation.head.version}" == B
    assert activation.status.config == building
    assert configs(setup.shards) == [building] * 3
    assert all(heads == {A} for heads in heads_of(setup.shards).values())

    # While building: new images are written under both heads, searches keep using the complete head A.
    during = [image(f"new-{i}") for i in range(6)]
    await add(gw, during)
    stored = {r.id: r for s in setup.shards for r in s.records.values()}
    for img, fresh in zip(during, projection(setup.catalog, B, [i.data for i in during]), strict=True):
        assert set(stored[img.id].semantics) == {A, B}
        np.testing.assert_allclose(stored[img.id].semantics[B], fresh, atol=1e-5)
    await asyncio.sleep(0.2)  # several refresh cycles: nothing may flip while the backfill is held
    assert configs(setup.shards) == [building] * 3
    result = await gw.search_by_text("harbour at dusk", 10, TIMEOUT)
    assert result.head == A and not result.partial
    expected = brute_force(setup.shards, SPACE_SEMANTIC, setup.search_query(A, "harbour at dusk"), 10, A)
    assert [h.id for h in result.hits] == [i for i, _ in expected]
    by_image = await gw.search_by_image(b"query pixels", 10, SPACE_SEMANTIC, TIMEOUT)
    query = projection(setup.catalog, A, [b"query pixels"])[0]
    assert by_image.head == A
    assert [h.id for h in by_image.hits] == [i for i, _ in brute_force(setup.shards, SPACE_SEMANTIC, query, 10, A)]
    by_id = await gw.search_by_id("new-2", 10, SPACE_SEMANTIC, False, TIMEOUT)
    query = stored["new-2"].semantics[A]
    assert by_id.head == A
    assert [h.id for h in by_id.hits] == [
        i for i, _ in brute_force(setup.shards, SPACE_SEMANTIC, query, 10, A, exclude=["new-2"])
    ]

    # Let the backfill run; every search until (and after) the flip must succeed on one complete head.
    release.set()
    flipped = HeadConfig(building.epoch + 1, B, "")
    searches = 0
    while configs(setup.shards) != [flipped] * 3:
        result = await gw.search_by_text("harbour at dusk", 10, TIMEOUT)
        assert result.head in (A, B) and not result.partial
        expected = brute_force(
            setup.shards, SPACE_SEMANTIC, setup.search_query(result.head, "harbour at dusk"), 10, result.head
        )
        assert [h.id for h in result.hits] == [i for i, _ in expected]
        searches += 1
        assert searches < 2000, "the switch never flipped"
        await asyncio.sleep(0.005)
    await wait_for(lambda: gw.heads.current() == flipped, "the gateway to adopt the flip")

    assert all(heads == {A, B} for heads in heads_of(setup.shards).values())
    backfilled = sorted(i for s in setup.shards for i in s.backfilled.get(B, []))
    assert backfilled == sorted(i.id for i in before), "exactly the images stored before the switch are backfilled"
    stored = {r.id: r for s in setup.shards for r in s.records.values()}
    fresh = projection(setup.catalog, B, [i.data for i in before])
    for img, vector in zip(before, fresh, strict=True):
        np.testing.assert_allclose(stored[img.id].semantics[B], vector, atol=1e-5)

    # After the flip searches use B over every image; writes carry B alone, equal to the backfilled vector.
    result = await gw.search_by_text("harbour at dusk", 25, TIMEOUT)
    assert result.head == B
    expected = brute_force(setup.shards, SPACE_SEMANTIC, setup.search_query(B, "harbour at dusk"), 25, B)
    assert [h.id for h in result.hits] == [i for i, _ in expected] and len(expected) == len(before) + len(during)
    await add(gw, [image("copy-of-old-3", before[3].data)])
    copy = next(s.records["copy-of-old-3"] for s in setup.shards if "copy-of-old-3" in s.records)
    assert set(copy.semantics) == {B}
    np.testing.assert_allclose(copy.semantics[B], stored["old-3"].semantics[B], atol=1e-5)


async def test_a_stale_gateway_refreshes_and_writes_both_heads(setup: Setup) -> None:
    gw1 = await setup.gateway()
    gw2 = await setup.gateway(head_refresh_seconds=3600.0)
    await add(gw1, [image(f"old-{i}") for i in range(6)])
    release = setup.gate()
    await gw1.activate_head("lin-b")
    building = configs(setup.shards)[0]
    assert building.building == B and gw2.heads.current() == HeadConfig(building.epoch - 1, A, "")

    late = image("late")
    await add(gw2, [late])
    (home,) = [s for s in setup.shards if "late" in s.records]
    assert home.refused == ["late"], "the shard must have refused the stale single-head write first"
    assert set(home.records["late"].semantics) == {A, B}
    np.testing.assert_allclose(
        home.records["late"].semantics[B], projection(setup.catalog, B, [late.data])[0], atol=1e-5
    )
    assert gw2.heads.current() == building
    release.set()
    flipped = HeadConfig(building.epoch + 1, B, "")
    await wait_for(lambda: configs(setup.shards) == [flipped] * 3, "the flip")

    # gw2 missed the flip too: its write (still under both heads) must be stored with the now active head B.
    assert gw2.heads.current() == building
    await add(gw2, [image("after-flip")])
    (home,) = [s for s in setup.shards if "after-flip" in s.records]
    assert B in home.records["after-flip"].semantics


async def test_a_shard_down_at_activation_delays_the_flip_until_it_is_back(setup: Setup) -> None:
    gw = await setup.gateway()
    await add(gw, [image(f"old-{i}") for i in range(12)])
    s0, s1, s2 = setup.shards
    s2.down = True
    activation = await gw.activate_head("lin-b")
    assert activation.failed_shards == [s2.name]
    building = s0.config
    assert building.building == B and s1.config == building and s2.config == HeadConfig(1, A, "")
    await wait_for(lambda: all(B in r.semantics for s in (s0, s1) for r in s.records.values()), "the backfill")
    await asyncio.sleep(0.2)
    assert configs(setup.shards)[:2] == [building] * 2, "no flip while a shard has not got the building head"
    result = await gw.search_by_text("a quiet lake", 5, TIMEOUT)
    assert result.head == A and result.failed_shards == [s2.name]

    s2.down = False
    flipped = HeadConfig(building.epoch + 1, B, "")
    await wait_for(lambda: configs(setup.shards) == [flipped] * 3, "the flip")
    assert all(B in heads for heads in heads_of(setup.shards).values())


async def test_activating_the_active_head_cancels_a_build(setup: Setup) -> None:
    gw = await setup.gateway()
    await add(gw, [image("one")])
    release = setup.gate()
    await gw.activate_head("lin-b")
    building = setup.shards[0].config
    cancelled = await gw.activate_head("lin-a")
    assert cancelled.status.config == HeadConfig(building.epoch + 1, A, "")
    assert configs(setup.shards) == [HeadConfig(building.epoch + 1, A, "")] * 3
    await add(gw, [image("two")])
    assert heads_of(setup.shards)["two"] == {A}
    release.set()
    await asyncio.sleep(0.2)
    assert configs(setup.shards) == [HeadConfig(building.epoch + 1, A, "")] * 3


async def test_a_gateway_started_with_every_shard_down_serves_once_they_answer(setup: Setup) -> None:
    for s in setup.shards:
        s.down = True
    gw = await setup.gateway()
    with pytest.raises(Unavailable):
        await gw.search_by_text("a quiet lake", 5, TIMEOUT)
    with pytest.raises(Unavailable):
        await gw.add_images(stream([image("early")]), lambda: TIMEOUT)
    for s in setup.shards:
        s.down = False
    await wait_for(lambda: configs(setup.shards) == [HeadConfig(1, A, "")] * 3, "the first configuration")
    await wait_for(lambda: gw.heads.config == HeadConfig(1, A, ""), "the gateway to learn it")
    await add(gw, [image("later")])
    result = await gw.search_by_text("a quiet lake", 5, TIMEOUT)
    assert result.head == A and [h.id for h in result.hits] == ["later"]


async def test_every_backfill_page_size_the_settings_accept_completes_a_switch(setup: Setup) -> None:
    try:
        settings = make_settings(setup.tmp, setup.shards, backfill_page_size=SCAN_MAX_PAGE + 1)
    except ValidationError:
        return  # refusing the value at start is a fix as good as clamping it to what a shard takes
    gw = Gateway(settings, FakeEncoder(setup.catalog.info), FakeTagger(), setup.shards)
    await gw.start(catalog=setup.catalog)
    setup.gateways.append(gw)
    await add(gw, [image(f"old-{i}") for i in range(6)])
    await gw.activate_head("lin-b")
    flipped = HeadConfig(3, B, "")
    await wait_for(lambda: configs(setup.shards) == [flipped] * 3, "the flip", timeout=3.0)


async def test_activating_the_head_already_active_or_building_changes_nothing(setup: Setup) -> None:
    gw = await setup.gateway()
    again = await gw.activate_head("lin-a")
    assert again.previous == A and configs(setup.shards) == [HeadConfig(1, A, "")] * 3
    assert again.status.config == HeadConfig(1, A, "")
    release = setup.gate()
    await gw.activate_head("lin-b")
    building = HeadConfig(2, A, B)
    twice = await gw.activate_head(B)
    assert twice.status.config == building and configs(setup.shards) == [building] * 3
    release.set()
    await wait_for(lambda: configs(setup.shards) == [HeadConfig(3, B, "")] * 3, "the flip")
    await asyncio.sleep(0.1)


async def test_a_second_gateway_finishes_a_switch_whose_gateway_went_away(setup: Setup) -> None:
    gw1 = await setup.gateway()
    await add(gw1, [image(f"old-{i}") for i in range(9)])
    release = setup.gate()
    await gw1.activate_head("lin-b")
    building = setup.shards[0].config
    # Let the reconciler consume the activation's wake-up first (see the close test below).
    await asyncio.sleep(0.1)
    assert await close_gateway(gw1)
    setup.gateways.remove(gw1)
    release.set()
    assert configs(setup.shards) == [building] * 3
    assert not any(B in heads for heads in heads_of(setup.shards).values())

    gw2 = await setup.gateway()
    flipped = HeadConfig(building.epoch + 1, B, "")
    await wait_for(lambda: configs(setup.shards) == [flipped] * 3, "the second gateway to finish the switch")
    stored = {r.id: r for s in setup.shards for r in s.records.values()}
    ids = sorted(stored)
    fresh = projection(setup.catalog, B, [f"pixels of {i}".encode() for i in ids])
    for image_id, vector in zip(ids, fresh, strict=True):
        np.testing.assert_allclose(stored[image_id].semantics[B], vector, atol=1e-5)
    await wait_for(lambda: gw2.heads.current() == flipped, "the second gateway to adopt the flip")


async def test_close_right_after_an_activation_stops_the_reconciler(setup: Setup) -> None:
    gw = await setup.gateway()
    await add(gw, [image(f"old-{i}") for i in range(3)])
    release = setup.gate()
    await gw.activate_head("lin-b")
    setup.gateways.remove(gw)
    try:
        assert await close_gateway(gw, timeout=2.0), "Gateway.close() hung"
    finally:
        release.set()


async def test_a_failing_backfill_is_retried_at_the_refresh_pace(setup: Setup) -> None:
    refresh = 0.05
    gw = await setup.gateway(head_refresh_seconds=refresh)
    await add(gw, [image(f"old-{i}") for i in range(6)])
    refusing = setup.shards[0]
    refusing.scan_error = InvalidArgument("the shard refuses this scan")
    await gw.activate_head("lin-b")
    period = 0.5
    await asyncio.sleep(period)
    # One attempt per refresh cycle, with generous slack for the wake-ups of the other shards' backfills.
    assert refusing.scans <= 3 * (period / refresh) + 5, f"{refusing.scans} scans in {period} s"
