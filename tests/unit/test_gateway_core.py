"""Gateway core over in-memory peers: per-item adds, fan-out search and merging, deletes, reads, tagging."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest

from imgsearch.gateway.core import AddResult, Gateway, NewImage, SearchResult
from imgsearch.gateway.peers import shard_for
from imgsearch.heads import HeadCatalog
from imgsearch.kit.convert import Matrix
from imgsearch.kit.errors import InvalidArgument, NotFound, ResourceExhausted, Unavailable
from tests.fakes import (
    SPACE_SEMANTIC,
    SPACE_VISUAL,
    FakeEncoder,
    FakeShard,
    FakeTagger,
    brute_force,
    close_gateway,
    image_features,
    image_logits,
    make_catalog,
    make_settings,
    status_code,
    stream,
    text_embedding,
)

TIMEOUT = 2.0


@dataclass
class Cluster:
    gw: Gateway
    shards: list[FakeShard]
    encoder: FakeEncoder
    tagger: FakeTagger
    catalog: HeadCatalog
    # Image bytes by id, for everything added through add().
    data: dict[str, bytes]

    @property
    def active(self) -> str:
        # The head the shards store as active: what the gateway must query with.
        (active,) = {s.config.active for s in self.shards}
        return active

    async def add(self, images: Sequence[NewImage]) -> list[AddResult]:
        results = await self.gw.add_images(stream(images), lambda: TIMEOUT)
        for image, result in zip(images, results, strict=True):
            if result.error is None:
                self.data[result.id] = image.data
        return results


def image_bytes(name: str) -> bytes:
    return f"fake image bytes of {name}".encode()


def new_image(image_id: str, **metadata: str) -> NewImage:
    return NewImage(image_id, image_bytes(image_id), dict(metadata), f"{image_id}.jpg")


def holder(shards: Sequence[FakeShard], image_id: str) -> list[str]:
    return [s.name for s in shards if image_id in s.records]


def unit(v: Matrix) -> Matrix:
    return (v / np.linalg.norm(v)).astype(np.float32)


@pytest.fixture()
async def cluster(tmp_path: Path, encoder_corrupt: frozenset[bytes]) -> AsyncIterator[Cluster]:
    catalog = make_catalog(tmp_path)
    shards = [FakeShard(f"index-{i}") for i in range(3)]
    encoder = FakeEncoder(catalog.info, corrupt=encoder_corrupt)
    tagger = FakeTagger()
    gw = Gateway(make_settings(tmp_path, shards), encoder, tagger, shards)
    await gw.start(catalog=catalog)
    try:
        yield Cluster(gw, shards, encoder, tagger, catalog, {})
    finally:
        assert await close_gateway(gw), "the gateway did not close"


@pytest.fixture()
def encoder_corrupt() -> frozenset[bytes]:
    return frozenset({image_bytes("corrupt")})


@pytest.fixture()
async def filled(cluster: Cluster) -> Cluster:
    results = await cluster.add([new_image(f"img-{i:02d}", n=str(i)) for i in range(30)])
    assert [r.error for r in results] == [None] * 30
    assert all(s.records for s in cluster.shards), "every shard should hold some of the 30 images"
    return cluster


def assert_matches(result: SearchResult, expected: list[tuple[str, float]], shards: Sequence[FakeShard]) -> None:
    assert [h.id for h in result.hits] == [i for i, _ in expected]
    np.testing.assert_allclose([h.score for h in result.hits], [s for _, s in expected], rtol=1e-5, atol=1e-5)
    for hit in result.hits:
        assert [hit.shard] == holder(shards, hit.id)


# ---- adds ---------------------------------------------------------------------------------------------


async def test_add_images_route_each_image_to_its_shard_and_store_its_signals(cluster: Cluster) -> None:
    images = [new_image(f"photo-{i}", colour=f"c{i}") for i in range(10)]
    anonymous = NewImage("", b"anonymous image", {}, "anon.png")
    results = await cluster.add([*images, anonymous])
    assert [r.position for r in results] == list(range(11))
    assert [r.error for r in results] == [None] * 11
    assert all(r.created for r in results)
    assert results[-1].id == hashlib.sha256(b"anonymous image").hexdigest()[:16]

    head = cluster.catalog.get(cluster.active)
    for image in [*images, NewImage(results[-1].id, anonymous.data, {}, "anon.png")]:
        assert holder(cluster.shards, image.id) == [shard_for(image.id, cluster.shards).name]
        rec = shard_for(image.id, cluster.shards).records[image.id]
        features, logits = image_features(image.data), image_logits(image.data)
        np.testing.assert_allclose(rec.visual, unit(features), atol=1e-6)
        assert rec.feature_norm == pytest.approx(float(np.linalg.norm(features)), rel=1e-5)
        assert set(rec.semantics) == {cluster.active}
        np.testing.assert_allclose(
            rec.semantics[cluster.active], head.project_images(features[None], None)[0], atol=1e-5
        )
        top = np.argsort(-logits)[:32]
        assert [c for c, _ in rec.top_logits] == top.tolist()
        np.testing.assert_allclose([v for _, v in rec.top_logits], logits[top])
        assert rec.metadata == image.metadata and rec.source_name == image.source_name

    again = await cluster.add([images[0]])
    assert again[0].error is None and not again[0].created
    assert sum(len(s.records) for s in cluster.shards) == 11


async def test_add_images_bad_items_fail_alone_and_limits_are_checked_before_encoding(cluster: Cluster) -> None:
    many = {f"k{i}": "v" for i in range(65)}
    most = {f"k{i}": "v" for i in range(64)}
    images = [
        new_image("good-0"),
        NewImage("corrupt", image_bytes("corrupt"), {}, "corrupt.jpg"),
        NewImage("empty", b"", {}, "empty.jpg"),
        NewImage("   ", image_bytes("spaces"), {}, "spaces.jpg"),
        NewImage("meta-65", image_bytes("meta-65"), many, "m65.jpg"),
        NewImage("meta-64", image_bytes("meta-64"), most, "m64.jpg"),
        NewImage("big-meta", image_bytes("big-meta"), {"k": "x" * (16 * 1024)}, "big.jpg"),
        NewImage("ctl\x07id", image_bytes("ctl"), {}, "ctl.jpg"),
        new_image("good-1"),
    ]
    results = await cluster.add(images)
    codes = {images[r.position].source_name: status_code(r.error) for r in results}
    bad = {"corrupt.jpg", "empty.jpg", "spaces.jpg", "m65.jpg", "big.jpg", "ctl.jpg"}
    assert codes == {
        image.source_name: grpc.StatusCode.INVALID_ARGUMENT if image.source_name in bad else None for image in images
    }
    stored = {i for s in cluster.shards for i in s.records}
    assert stored == {"good-0", "meta-64", "good-1"}
    seen = cluster.encoder.images_seen
    # Only the corrupt image reaches the encoder among the bad ones: its failure is the encoder's to find.
    for image in images:
        assert (image.data in seen) == (image.source_name not in bad - {"corrupt.jpg"}), image.source_name


async def test_add_images_with_a_shard_down_fail_only_that_shards_images(cluster: Cluster) -> None:
    down = cluster.shards[1]
    down.down = True
    images = [new_image(f"pic-{i}") for i in range(12)]
    on_down = {i.id for i in images if shard_for(i.id, cluster.shards) is down}
    assert on_down and len(on_down) < len(images), "the test needs images on both the down and the live shards"
    results = await cluster.add(images)
    for r in results:
        assert status_code(r.error) == (grpc.StatusCode.UNAVAILABLE if r.id in on_down else None), r.id
    assert {i for s in cluster.shards for i in s.records} == {i.id for i in images} - on_down


async def test_add_images_refuses_an_empty_stream(cluster: Cluster) -> None:
    with pytest.raises(InvalidArgument):
        await cluster.add([])


# ---- searches -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 7, 100])
async def test_search_by_text_merges_the_global_top_k(filled: Cluster, k: int) -> None:
    head = filled.catalog.get(filled.active)
    result = await filled.gw.search_by_text("  a   red bicycle ", k, TIMEOUT)
    query = head.project_texts(text_embedding("a red bicycle")[None])[0]
    expected = brute_force(filled.shards, SPACE_SEMANTIC, query, k, filled.active)
    assert len(expected) == min(k, 30)
    assert_matches(result, expected, filled.shards)
    assert result.head == filled.active and not result.partial and result.shards_total == 3


async def test_search_by_image_in_both_spaces_equals_brute_force(filled: Cluster) -> None:
    data = image_bytes("query")
    features, logits = image_features(data), image_logits(data)
    visual = await filled.gw.search_by_image(data, 5, SPACE_VISUAL, TIMEOUT)
    assert_matches(visual, brute_force(filled.shards, SPACE_VISUAL, unit(features), 5), filled.shards)
    assert visual.space == SPACE_VISUAL and visual.head == ""
    unspecified = await filled.gw.search_by_image(data, 5, 0, TIMEOUT)
    assert [h.id for h in unspecified.hits] == [h.id for h in visual.hits]

    head = filled.catalog.get(filled.active)
    query = head.project_images(features[None], logits[None])[0]
    semantic = await filled.gw.search_by_image(data, 6, SPACE_SEMANTIC, TIMEOUT)
    assert_matches(semantic, brute_force(filled.shards, SPACE_SEMANTIC, query, 6, filled.active), filled.shards)
    assert semantic.head == filled.active


@pytest.mark.parametrize("space", [SPACE_VISUAL, SPACE_SEMANTIC])
async def test_search_by_id_uses_the_stored_vector(filled: Cluster, space: int) -> None:
    image_id = "img-07"
    rec = shard_for(image_id, filled.shards).records[image_id]
    head = filled.active if space == SPACE_SEMANTIC else ""
    vector = rec.semantics[head] if head else rec.visual
    without = await filled.gw.search_by_id(image_id, 4, space, False, TIMEOUT)
    assert_matches(without, brute_force(filled.shards, space, vector, 4, head, exclude=[image_id]), filled.shards)
    with_self = await filled.gw.search_by_id(image_id, 4, space, True, TIMEOUT)
    assert_matches(with_self, brute_force(filled.shards, space, vector, 4, head), filled.shards)
    assert with_self.hits[0].id == image_id


async def test_search_by_id_of_a_missing_image_or_on_a_down_shard(filled: Cluster) -> None:
    with pytest.raises(NotFound):
        await filled.gw.search_by_id("never-added", 3, SPACE_VISUAL, False, TIMEOUT)
    shard_for("img-03", filled.shards).down = True
    with pytest.raises(Unavailable):
        await filled.gw.search_by_id("img-03", 3, SPACE_VISUAL, False, TIMEOUT)


async def test_search_with_a_shard_down_is_partial_and_names_it(filled: Cluster) -> None:
    down = filled.shards[2]
    down.down = True
    live = [s for s in filled.shards if s is not down]
    result = await filled.gw.search_by_text("sunset", 8, TIMEOUT)
    query = filled.catalog.get(filled.active).project_texts(text_embedding("sunset")[None])[0]
    assert_matches(result, brute_force(live, SPACE_SEMANTIC, query, 8, filled.active), filled.shards)
    assert result.partial and result.failed_shards == [down.name] and result.shards_total == 3

    data = image_bytes("query")
    visual = await filled.gw.search_by_image(data, 8, SPACE_VISUAL, TIMEOUT)
    expected = brute_force(live, SPACE_VISUAL, unit(image_features(data)), 8)
    assert_matches(visual, expected, filled.shards)
    assert visual.failed_shards == [down.name]


async def test_search_with_every_shard_down_is_unavailable(filled: Cluster) -> None:
    for s in filled.shards:
        s.down = True
    with pytest.raises(Unavailable):
        await filled.gw.search_by_text("sunset", 3, TIMEOUT)
    with pytest.raises(Unavailable):
        await filled.gw.search_by_image(image_bytes("query"), 3, SPACE_VISUAL, TIMEOUT)


async def test_a_shard_refusing_the_query_fails_the_whole_search(filled: Cluster) -> None:
    filled.shards[0].search_error = InvalidArgument("query has the wrong dimension")
    with pytest.raises(InvalidArgument, match="wrong dimension"):
        await filled.gw.search_by_text("sunset", 3, TIMEOUT)


async def test_search_arguments_are_checked(filled: Cluster) -> None:
    for call in (
        filled.gw.search_by_text("   ", 3, TIMEOUT),
        filled.gw.search_by_text("sunset", 1001, TIMEOUT),
        filled.gw.search_by_image(b"", 3, SPACE_VISUAL, TIMEOUT),
    ):
        with pytest.raises(InvalidArgument):
            await call
    assert filled.encoder.text_calls == [] and all(s.searches == [] for s in filled.shards)


# ---- deletes and reads ------------------------------------------------------------------------------


async def test_delete_images_reports_each_id(filled: Cluster) -> None:
    down = filled.shards[0]
    ids = ["img-01", "img-02", "nope", "img-03", "img-04", "img-05", "img-06"]
    on_down = {i for i in ids if shard_for(i, filled.shards) is down}
    stored_live = {i for i in ids if i in filled.data} - on_down
    assert on_down and stored_live, "the test needs ids on the down shard and stored ids on live ones"
    down.down = True
    outcomes, partial = await filled.gw.delete_images(ids, TIMEOUT)
    assert partial
    assert [o.id for o in outcomes] == ids
    for o in outcomes:
        expected = (
            grpc.StatusCode.UNAVAILABLE
            if o.id in on_down
            else None
            if o.id in stored_live
            else grpc.StatusCode.NOT_FOUND
        )
        assert status_code(o.error) == expected, o.id
    assert not any(i in s.records for s in filled.shards for i in stored_live)

    down.down = False
    outcomes, partial = await filled.gw.delete_images(sorted(on_down), TIMEOUT)
    assert not partial
    for o in outcomes:
        assert status_code(o.error) == (None if o.id in filled.data else grpc.StatusCode.NOT_FOUND), o.id
    assert not any(i in s.records for s in filled.shards for i in on_down)


async def test_delete_and_get_check_their_ids(filled: Cluster) -> None:
    for bad in ([], ["ok", " "], ["ok", ""]):
        with pytest.raises(InvalidArgument):
            await filled.gw.delete_images(bad, TIMEOUT)
        with pytest.raises(InvalidArgument):
            await filled.gw.get_images(bad, TIMEOUT)
    too_many = [f"id-{i}" for i in range(filled.gw.settings.max_ids_per_request + 1)]
    with pytest.raises(ResourceExhausted):
        await filled.gw.delete_images(too_many, TIMEOUT)
    assert sum(len(s.records) for s in filled.shards) == 30


async def test_get_images_in_request_order_with_missing_and_partial(filled: Cluster) -> None:
    ids = ["img-09", "ghost", "img-00", "img-17", "img-09", "img-22"]
    records, missing, partial = await filled.gw.get_images(ids, TIMEOUT)
    assert not partial and missing == ["ghost"]
    assert [r.id for r in records] == ["img-09", "img-00", "img-17", "img-22"]
    for r in records:
        assert [r.shard] == holder(filled.shards, r.id)
        assert r.metadata == {"n": str(int(r.id[4:]))} and r.source_name == f"{r.id}.jpg"

    down = shard_for("img-00", filled.shards)
    down.down = True
    records, missing, partial = await filled.gw.get_images(ids, TIMEOUT)
    assert partial and missing == ([] if shard_for("ghost", filled.shards) is down else ["ghost"])
    expected = [i for i in dict.fromkeys(ids) if i != "ghost" and shard_for(i, filled.shards) is not down]
    assert [r.id for r in records] == expected


# ---- tags ---------------------------------------------------------------------------------------------


async def test_tag_image_passes_the_active_head_and_the_last_vocabulary_version(filled: Cluster) -> None:
    filled.gw.saw_vocabulary(7)
    filled.gw.saw_vocabulary(3)
    data = image_bytes("to tag")
    ranked = await filled.gw.tag_image(data, 5, 0, TIMEOUT)
    (call,) = filled.tagger.rank_calls
    assert call.head == filled.active == ranked.head
    assert call.min_version == 7 and call.top_k == 5
    np.testing.assert_array_equal(call.features, image_features(data))
    assert call.logits is not None
    np.testing.assert_array_equal(call.logits, image_logits(data))
    # Unset k (0 on the wire) means the default, 10, as everywhere.
    await filled.gw.tag_image(data, 0, 0, TIMEOUT)
    assert filled.tagger.rank_calls[-1].top_k == 10
