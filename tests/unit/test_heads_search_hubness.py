"""Search hubness correction folded into semantic vectors: scores and rankings against hand-computed values."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from imgsearch.heads import ConSEHead, l2_normalise, load_head, save_head
from imgsearch.heads.model import SearchHubness
from imgsearch.kit.errors import InvalidArgument

# A 3-d space whose last axis no text uses (as MiniLM leaves some directions unused).
AXIS = np.array([0.0, 0.0, 1.0], dtype=np.float32)
# Caption bank: two captions.
BANK = np.array([[1.0, 0.0, 0.0], [0.6, 0.8, 0.0]], dtype=np.float32)


def _hub(scale: float = 0.5, weight: float = 0.5, centre: float = 0.5) -> SearchHubness:
    return SearchHubness(bank=BANK, weight=weight, centre=centre, axis=AXIS, scale=scale, kind="csls", k=1)


def test_the_folded_score_is_the_cosine_minus_the_images_offset_over_the_norms() -> None:
    hub = _hub()
    image = np.array([[1.0, 0.0, 0.0]], np.float32)
    # CSLS k=1: the image's nearest caption has cosine 1, so r = 1 and d = 0.5 * (1 - 0.5) = 0.25.
    assert np.allclose(hub.offsets(image), [0.25], atol=1e-6)
    folded = hub.fold_images(image)
    # x' = e1 - (0.25 / 0.5) e3, normalised: (1, 0, -0.5) / sqrt(1.25).
    assert np.allclose(folded, [[1 / np.sqrt(1.25), 0.0, -0.5 / np.sqrt(1.25)]], atol=1e-6)
    query = hub.fold_queries(np.array([[1.0, 0.0, 0.0]], np.float32))
    # q' = e1 + 0.5 e3, normalised; q' . x' = (1 - 0.25) / 1.25 = 0.6.
    assert np.allclose(query, [[1 / np.sqrt(1.25), 0.0, 0.5 / np.sqrt(1.25)]], atol=1e-6)
    assert np.allclose(query @ folded.T, [[0.6]], atol=1e-6)


def test_a_hub_loses_its_place_as_the_plain_correction_says() -> None:
    hub = _hub(scale=1.0, weight=1.0, centre=0.0)
    # Image 0 lies on a caption (a hub, r = 1); image 1's nearest caption has cosine 0.8 (r = 0.8).
    images = l2_normalise(np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], np.float32))
    r = hub.offsets(images)  # weight 1, centre 0: the hubness itself
    assert np.allclose(r, [1.0, 0.8], atol=1e-6)
    query = l2_normalise(np.array([[0.75, 0.66, 0.0]], np.float32))
    plain = query @ images.T
    assert plain[0, 0] > plain[0, 1]  # plain cosine prefers the hub
    corrected = plain - r[None, :]
    folded = hub.fold_queries(query) @ hub.fold_images(images).T
    # Same order as cos - r, and each score is (cos - r) / (|q'| |x'|) with |q'| = sqrt(2).
    assert np.argsort(-folded[0]).tolist() == np.argsort(-corrected[0]).tolist() == [1, 0]
    norms = np.sqrt(2.0) * np.sqrt(1.0 + r**2)
    assert np.allclose(folded[0], corrected[0] / norms, atol=1e-6)


def test_a_stored_vector_used_as_a_query_drops_its_own_offset() -> None:
    hub = _hub()
    image = l2_normalise(np.array([[0.6, 0.8, 0.0]], np.float32))
    stored = hub.fold_images(image)
    # The query made from the stored vector is the image's own direction plus the scale on the axis.
    assert np.allclose(hub.fold_queries(stored), hub.fold_queries(image), atol=1e-6)
    assert np.allclose(hub.fold_queries(stored), l2_normalise(np.array([[0.6, 0.8, 0.5]], np.float32)), atol=1e-6)
    # Empty batches pass through.
    assert hub.fold_images(image[:0]).shape == (0, 3) and hub.fold_queries(image[:0]).shape == (0, 3)


def _write(path: Path, extra: dict[str, Any], arrays: dict[str, Any]) -> None:
    manifest = {
        "name": "tiny",
        "version": "1",
        "image_model": "m@1",
        "feature_dim": 4,
        "text_dim": 3,
        "conse_weight": 0.0,
        "image_layers": [{"weight": "w", "bias": "b", "activation": "none"}],
        **extra,
    }
    rng = np.random.default_rng(5)
    base = {"w": rng.normal(size=(4, 3)).astype(np.float32), "b": np.zeros(3, np.float32)}
    save_head(path, manifest, {**base, **arrays})


SPEC = {"bank": "sb", "axis": "sa", "weight": 0.5, "centre": 0.5, "scale": 0.5, "kind": "csls", "k": 1}
CONSE = ConSEHead(class_embeddings=BANK, top_t=1)


def test_a_head_with_a_search_hub_folds_what_it_stores_and_what_it_searches_with(tmp_path: Path) -> None:
    path = tmp_path / "h.npz"
    _write(path, {"search_hub": SPEC}, {"sb": BANK * 2, "sa": AXIS * 3})
    head = load_head(path, image_model="m@1", feature_dim=4, text_dim=3, conse=CONSE)
    assert head.search_hub is not None and np.allclose(head.search_hub.axis, AXIS)
    feats = np.random.default_rng(6).normal(size=(3, 4)).astype(np.float32)
    plain = l2_normalise(feats @ head.image_layers[0].weight)
    assert np.allclose(head.project_images(feats, None), head.search_hub.fold_images(plain), atol=1e-6)
    texts = l2_normalise(np.array([[1.0, 2.0, 0.0]], np.float32))
    assert np.allclose(head.search_queries(texts), head.search_hub.fold_queries(texts), atol=1e-6)
    # Tag ranking does not see the fold: the tag direction is the plain projection.
    assert np.allclose(head.tag_direction(feats, None), plain, atol=1e-6)
    # Without a search hub, searches use the projections as they are.
    _write(path, {}, {})
    bare = load_head(path, image_model="m@1", feature_dim=4, text_dim=3, conse=CONSE)
    assert np.allclose(bare.search_queries(texts), texts) and bare.search_hub is None


@pytest.mark.parametrize(
    ("spec", "arrays"),
    [
        ({**SPEC, "axis": "missing"}, {"sb": BANK}),
        ({**SPEC, "kind": "mystery"}, {"sb": BANK, "sa": AXIS}),
        ({**SPEC, "scale": 0.0}, {"sb": BANK, "sa": AXIS}),
        (SPEC, {"sb": BANK, "sa": AXIS[:2]}),
        (SPEC, {"sb": np.zeros((0, 3), np.float32), "sa": AXIS}),
    ],
)
def test_malformed_search_hubs_are_refused(tmp_path: Path, spec: dict[str, Any], arrays: dict[str, Any]) -> None:
    path = tmp_path / "bad.npz"
    _write(path, {"search_hub": spec}, arrays)
    with pytest.raises(InvalidArgument):
        load_head(path, image_model="m@1", feature_dim=4, text_dim=3, conse=CONSE)
