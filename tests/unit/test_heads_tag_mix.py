"""TagMix: ConSE pulled back through the text adapter's inverse, mixed unnormalised with the learned direction."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from imgsearch.heads import ConSEHead, Layer, LearnedHead, load_head, save_head
from imgsearch.heads.model import TagMix
from imgsearch.kit.errors import InvalidArgument

# A 2-d residual adapter: x -> normalise(x M + b) with M = W + I = diag(2, 1) and b = (0, 0.5).
ADAPTER = Layer(np.array([[1.0, 0.0], [0.0, 0.0]], np.float32), np.array([0.0, 0.5], np.float32), "none")
CLASSES = np.array([[1.0, 0.0], [0.0, 1.0]], np.float32)


def _head(mix: TagMix | None, weight: float = 1.0, top_t: int = 1) -> LearnedHead:
    return LearnedHead(
        name="h",
        version="1",
        kind="linear",
        image_model="m",
        image_layers=[Layer(np.eye(2, dtype=np.float32), np.zeros(2, np.float32), "none")],
        text_layers=[ADAPTER],
        feature_norm="none",
        feature_mean=None,
        feature_std=None,
        text_residual=True,
        conse_weight=0.0,
        conse=ConSEHead(class_embeddings=CLASSES, top_t=top_t, anchor_penalty=0.0),
        manifest={},
        tag_conse_weight=weight,
        tag_mix=mix,
    )


def test_raw_texts_inverts_the_adapter() -> None:
    head = _head(TagMix())
    raw = np.array([[0.6, 0.8], [1.0, 0.0], [0.0, -1.0]], np.float32)
    # (0.6, 0.8) -> (1.2, 1.3) / sqrt(3.13); (1, 0) -> (2, 0.5) / sqrt(4.25); (0, -1) -> (0, -0.5) -> (0, -1).
    projected = head.project_texts(raw)
    assert np.allclose(projected[0], np.array([1.2, 1.3]) / np.sqrt(3.13), atol=1e-6)
    assert np.allclose(head.raw_texts(projected), raw, atol=1e-5)
    inv, offset = head.inverse()
    assert np.allclose(inv, np.diag([0.5, 1.0])) and np.allclose(offset, [0.0, 0.5])


def test_the_raw_term_scores_a_tag_as_conse_over_the_adapters_gain() -> None:
    # Logits make ConSE's direction c = (1, 0); the raw term is c M^-T = (0.5, 0).
    head = _head(TagMix(adapted=0.0, raw=1.0))
    logits = np.array([[10.0, -10.0]], np.float32)
    direction = head.tag_direction(np.array([[0.0, 1.0]], np.float32), logits)
    assert np.allclose(direction, [[0.5, 0.0]], atol=1e-6)
    tag = np.array([[0.6, 0.8]], np.float32)
    # (c . t + b M^-1 . c) / |t M + b| = (0.6 + 0) / sqrt(3.13).
    assert np.allclose(direction @ head.project_texts(tag).T, 0.6 / np.sqrt(3.13), atol=1e-6)


def test_the_mix_is_unnormalised_and_weighted_per_image() -> None:
    mix = TagMix(temperature=2.0, adapted=1.5, raw=0.5, learned_scale=1.25)
    head = _head(mix, weight=0.4, top_t=2)
    # Probabilities at temperature 2 of logits (log 9, 0): softmax(log 3, 0) = (0.75, 0.25); c = normalise(3, 1).
    logits = np.array([[np.log(9.0), 0.0]], np.float32)
    c = np.array([3.0, 1.0]) / np.sqrt(10.0)
    u = c * [2.0, 1.0] + [0.0, 0.5]
    adapted, raw, learned = u / np.linalg.norm(u), c * [0.5, 1.0], np.array([0.0, 1.0])
    want = 0.4 * (1.5 * adapted + 0.5 * raw) + 0.6 * 1.25 * learned
    assert np.allclose(head.tag_direction(np.array([[0.0, 2.0]], np.float32), logits), [want], atol=1e-5)
    # Weight 0: the learned direction alone, scaled, and no logits needed.
    alone = dataclasses.replace(head, tag_conse_weight=0.0).tag_direction(np.array([[0.0, 2.0]], np.float32), None)
    assert np.allclose(alone, [[0.0, 1.25]])


def test_raw_anchor_penalty_is_the_best_minilm_cosine_to_a_class_name() -> None:
    head = _head(TagMix(raw_anchor_penalty=0.5))
    raw = np.array([[0.6, 0.8], [1.0, 0.0]], np.float32)
    # Best class cosines in MiniLM's space: 0.8 and 1.0.
    assert np.allclose(head.tag_bias(head.project_texts(raw)), [-0.4, -0.5], atol=1e-5)


def _write(path: Path, extra: dict[str, Any]) -> None:
    manifest = {
        "name": "h",
        "image_model": "m@1",
        "feature_dim": 2,
        "text_dim": 2,
        "image_layers": [{"weight": "w", "bias": "b"}],
        "text_layers": [{"weight": "tw", "bias": "tb"}],
        "text_residual": True,
        **extra,
    }
    arrays = {"w": np.eye(2, dtype=np.float32), "b": np.zeros(2, np.float32), "tw": ADAPTER.weight, "tb": ADAPTER.bias}
    save_head(path, manifest, arrays)


def test_load_head_reads_and_checks_tag_mix(tmp_path: Path) -> None:
    conse = ConSEHead(class_embeddings=CLASSES)
    mix = TagMix(2.0, 1.5, 0.5, 1.0, 0.375)
    _write(tmp_path / "h.npz", {"tag_conse_weight": 1.0, "tag_mix": mix.manifest()})
    head = load_head(tmp_path / "h.npz", image_model="m@1", feature_dim=2, text_dim=2, conse=conse)
    assert head.tag_mix == mix and head.needs_logits
    assert json.loads(json.dumps(mix.manifest())) == dataclasses.asdict(mix)
    _write(tmp_path / "bad.npz", {"tag_mix": {"temperature": 0.0}})
    with pytest.raises(InvalidArgument, match="temperature"):
        load_head(tmp_path / "bad.npz", image_model="m@1", feature_dim=2, text_dim=2, conse=conse)
    _write(tmp_path / "odd.npz", {"tag_mix": {"colour": 1.0}})
    with pytest.raises(InvalidArgument, match="malformed"):
        load_head(tmp_path / "odd.npz", image_model="m@1", feature_dim=2, text_dim=2, conse=conse)
