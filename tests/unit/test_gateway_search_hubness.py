"""The gateway with a head that folds a search hubness correction: every semantic query path uses the fold."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest

from imgsearch.gateway.core import Gateway, NewImage
from imgsearch.gateway.search import ROCCHIO, rocchio
from imgsearch.heads import HeadCatalog, save_head
from imgsearch.heads.model import LearnedHead
from tests.fakes import (
    CLASSES,
    FEATURE_DIM,
    IMAGE_MODEL_VERSION,
    SPACE_SEMANTIC,
    TEXT_DIM,
    FakeEncoder,
    FakeShard,
    FakeTagger,
    brute_force,
    close_gateway,
    image_features,
    make_info,
    make_settings,
    stream,
    text_embedding,
)

TIMEOUT = 2.0
HEAD = "folded@1"
SPEC = {"bank": "sb", "axis": "sa", "weight": 1.0, "centre": 0.2, "scale": 0.5, "k": 3, "kind": "csls"}


def write_folded_head(heads_dir: Path) -> None:
    rng = np.random.default_rng(7)
    bank = rng.standard_normal((50, TEXT_DIM)).astype(np.float32)
    axis = np.zeros(TEXT_DIM, np.float32)
    axis[0] = 1.0
    save_head(
        heads_dir / "folded.npz",
        {
            "name": "folded",
            "version": "1",
            "kind": "linear",
            "image_model": IMAGE_MODEL_VERSION,
            "feature_dim": FEATURE_DIM,
            "text_dim": TEXT_DIM,
            "feature_norm": "l2",
            "conse_weight": 0.0,
            "image_layers": [{"weight": "w", "bias": "b", "activation": "none"}],
            "search_hub": SPEC,
        },
        {
            "w": rng.standard_normal((FEATURE_DIM, TEXT_DIM)).astype(np.float32),
            "b": np.zeros(TEXT_DIM, np.float32),
            "sb": bank,
            "sa": axis,
        },
    )


@pytest.fixture()
async def setup(tmp_path: Path) -> AsyncIterator[tuple[Gateway, list[FakeShard], LearnedHead]]:
    write_folded_head(tmp_path)
    classes = np.random.default_rng(3).standard_normal((CLASSES, TEXT_DIM)).astype(np.float32)
    catalog = HeadCatalog.load(make_info(), classes / np.linalg.norm(classes, axis=1, keepdims=True), tmp_path)
    head = catalog.get(HEAD)
    assert isinstance(head, LearnedHead) and head.search_hub is not None
    shards = [FakeShard(f"index-{i}") for i in range(2)]
    settings = make_settings(tmp_path, shards, default_head="folded")
    gw = Gateway(settings, FakeEncoder(catalog.info), FakeTagger(), shards)
    await gw.start(catalog=catalog)
    images = [NewImage(f"img-{i}", f"bytes of {i}".encode(), {}, f"{i}.jpg") for i in range(12)]
    assert [r.error for r in await gw.add_images(stream(images), lambda: TIMEOUT)] == [None] * 12
    try:
        yield gw, shards, head
    finally:
        assert await close_gateway(gw)


def stored(shards: list[FakeShard], image_id: str) -> np.ndarray:
    return next(s.records[image_id].semantics[HEAD] for s in shards if image_id in s.records)


def last_query(shards: list[FakeShard]) -> np.ndarray:
    queries = [s.queries[-1] for s in shards]
    np.testing.assert_allclose(queries[0], queries[1])
    return queries[0]


async def test_images_are_stored_folded_and_text_queries_carry_the_scale(
    setup: tuple[Gateway, list[FakeShard], LearnedHead],
) -> None:
    gw, shards, head = setup
    assert head.search_hub is not None
    features = image_features(b"bytes of 3")[None, :]
    np.testing.assert_allclose(stored(shards, "img-3"), head.project_images(features, None)[0], atol=1e-6)
    # The stored vector holds the image's offset on the axis: -d / scale (before normalising).
    plain = head.learned_direction(features)
    d = head.search_hub.offsets(plain)[0]
    ratio = stored(shards, "img-3")[0] / np.linalg.norm(stored(shards, "img-3")[1:])
    assert ratio == pytest.approx(-d / 0.5 / np.linalg.norm(plain[0, 1:]), rel=1e-4)

    result = await gw.search_by_text("a red bicycle", 5, TIMEOUT)
    query = head.search_queries(head.project_texts(text_embedding("a red bicycle")[None, :]))[0]
    np.testing.assert_allclose(last_query(shards), query, atol=1e-6)
    assert query[0] == pytest.approx(0.5 / np.sqrt(1.25), abs=1e-6)
    expected = brute_force(shards, SPACE_SEMANTIC, query, 5, HEAD)
    assert [(h.id, round(h.score, 5)) for h in result.hits] == [(i, round(s, 5)) for i, s in expected]


async def test_image_queries_by_bytes_id_and_examples_use_the_fold(
    setup: tuple[Gateway, list[FakeShard], LearnedHead],
) -> None:
    gw, shards, head = setup
    await gw.search_by_image(b"bytes of 5", 3, SPACE_SEMANTIC, TIMEOUT)
    features = image_features(b"bytes of 5")[None, :]
    want = head.search_queries(head.project_images(features, None))[0]
    np.testing.assert_allclose(last_query(shards), want, atol=1e-6)

    await gw.search_by_id("img-5", 3, SPACE_SEMANTIC, True, TIMEOUT)
    # The stored vector's own offset is dropped: the same query as the fresh projection of its bytes.
    np.testing.assert_allclose(last_query(shards), want, atol=1e-5)

    await gw.search_by_examples(["img-1", "img-2"], ["img-3"], "", 3, SPACE_SEMANTIC, TIMEOUT)
    combined = rocchio(None, [stored(shards, "img-1"), stored(shards, "img-2")], [stored(shards, "img-3")], ROCCHIO)
    np.testing.assert_allclose(last_query(shards), head.search_queries(combined[None, :])[0], atol=1e-6)
