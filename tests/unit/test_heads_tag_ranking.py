"""Tag-ranking math of learned heads: the ConSE-confidence gate and the hubness correction, by hand."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from imgsearch.heads import ConSEHead, l2_normalise, load_head, save_head
from imgsearch.heads.model import TagGate, TagHubness
from imgsearch.kit.errors import InvalidArgument

# Unit image directions in a 2-d space.
BANK = np.array([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]], dtype=np.float32)
TAGS = np.array([[1.0, 0.0], [0.0, 1.0], [0.8, 0.6]], dtype=np.float32)


def test_csls_hubness_is_the_mean_of_the_k_nearest_bank_cosines() -> None:
    hub = TagHubness(bank=BANK, k=2, weight=0.5)
    # Cosines: [1, 0, .6], [0, 1, .8], [.8, .6, .96]; the 2 largest of each row, averaged.
    assert np.allclose(hub.hubness(TAGS), [0.8, 0.9, 0.88], atol=1e-6)
    assert np.allclose(hub.penalty(TAGS), [0.4, 0.45, 0.44], atol=1e-6)
    # k larger than the bank: every row counts.
    assert np.allclose(TagHubness(bank=BANK, k=9, weight=1.0).hubness(TAGS[:1]), [1.6 / 3], atol=1e-6)


def test_inverted_softmax_hubness_is_the_tempered_log_mean_exp() -> None:
    hub = TagHubness(bank=BANK, k=1, weight=1.0, kind="inverted_softmax", temperature=0.5)
    want = [0.5 * np.log(np.mean(np.exp(np.array(c) / 0.5))) for c in ([1, 0, 0.6], [0, 1, 0.8], [0.8, 0.6, 0.96])]
    assert np.allclose(hub.hubness(TAGS), want, atol=1e-6)
    # A very low temperature tends to the largest cosine (minus T log n).
    cold = TagHubness(bank=BANK, k=1, weight=1.0, kind="inverted_softmax", temperature=1e-3)
    assert np.allclose(cold.hubness(TAGS), [1.0, 1.0, 0.96], atol=2e-3)


def test_a_tags_correction_does_not_depend_on_the_other_tags() -> None:
    hub = TagHubness(bank=BANK, k=2, weight=0.5)
    together = hub.penalty(TAGS)
    alone = np.concatenate([hub.penalty(TAGS[i : i + 1]) for i in range(3)])
    assert np.allclose(together, alone) and hub.penalty(TAGS[:0]).shape == (0,)


def test_conse_confidence_gate_ramps_with_the_largest_class_probability() -> None:
    gate = TagGate(bank=np.zeros((0, 2), np.float32), k=1, low=0.25, high=0.75, weight_out=0.2, weight_in=0.8,
                   signal="conse_confidence")  # fmt: skip
    # Max probabilities: 0.5 (two equal logits), 0.9 (log 9 vs 0), 0.2 (five equal logits, padded with -inf).
    logits = np.array([[0, 0, -1e9, -1e9, -1e9], [np.log(9), 0, -1e9, -1e9, -1e9], [0, 0, 0, 0, 0]], np.float32)
    learned = np.zeros((3, 2), np.float32)
    assert np.allclose(gate.scores(learned, logits), [0.5, 0.9, 0.2], atol=1e-6)
    assert np.allclose(gate.weights(learned, logits), [0.5, 0.8, 0.2], atol=1e-6)
    with pytest.raises(InvalidArgument):
        gate.weights(learned, None)


def _write(path: Path, extra: dict[str, Any], arrays: dict[str, Any] | None = None) -> None:
    rng = np.random.default_rng(3)
    manifest = {
        "name": "tiny",
        "version": "1",
        "image_model": "m@1",
        "feature_dim": 4,
        "text_dim": 2,
        "conse_weight": 0.0,
        "image_layers": [{"weight": "w", "bias": "b", "activation": "none"}],
        **extra,
    }
    base = {"w": rng.normal(size=(4, 2)).astype(np.float32), "b": np.zeros(2, np.float32)}
    save_head(path, manifest, {**base, **(arrays or {})})


CLASSES = np.array([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]], dtype=np.float32)


def test_load_head_reads_the_confidence_gate_and_the_hubness_correction(tmp_path: Path) -> None:
    path = tmp_path / "h.npz"
    gate = {"signal": "conse_confidence", "low": 0.4, "high": 0.6, "weight_out": 0.1, "weight_in": 0.9}
    hub = {"bank": "hub_bank", "k": 2, "weight": 0.5, "kind": "csls"}
    _write(path, {"tag_gate": gate, "tag_hub": hub, "tag_anchor_penalty": 0.5}, {"hub_bank": BANK * 3})
    conse = ConSEHead(class_embeddings=CLASSES, top_t=2)
    head = load_head(path, image_model="m@1", feature_dim=4, text_dim=2, conse=conse)
    assert head.needs_logits and head.tag_gate is not None and head.tag_gate.signal == "conse_confidence"
    assert head.tag_hub is not None and np.allclose(np.linalg.norm(head.tag_hub.bank, axis=1), 1.0)
    # Bias = -0.5 * best anchor cosine - 0.5 * CSLS hubness; anchors [1,0], [0,1], [.6,.8].
    # Tag [1,0]: best anchor 1, hubness .8 -> -.9; [0,1]: 1, .9 -> -.95; [.8,.6]: .96, .88 -> -.92.
    assert np.allclose(head.tag_bias(TAGS), [-0.9, -0.95, -0.92], atol=1e-6)
    feats = np.random.default_rng(4).normal(size=(2, 4)).astype(np.float32)
    logits = np.array([[0.0, 0.0, 0.0], [5.0, 0.0, 0.0]], np.float32)  # max prob 1/3 and ~0.987
    learned = head.learned_direction(feats)
    w = np.array([0.1, 0.9], np.float32)[:, None]
    want = l2_normalise(w * conse.project_images(feats, logits) + (1 - w) * learned)
    assert np.allclose(head.tag_direction(feats, logits), want, atol=1e-5)
    manifest = json.loads(bytes(np.load(path)["manifest"]).decode())
    assert "bank" not in manifest["tag_gate"]


def test_old_head_files_load_as_before(tmp_path: Path) -> None:
    path = tmp_path / "old.npz"
    _write(path, {"tag_anchor_penalty": 0.5})
    conse = ConSEHead(class_embeddings=CLASSES, top_t=2)
    head = load_head(path, image_model="m@1", feature_dim=4, text_dim=2, conse=conse)
    assert head.tag_hub is None and head.tag_gate is None
    assert np.allclose(head.tag_bias(TAGS), [-0.5, -0.5, -0.48], atol=1e-6)


@pytest.mark.parametrize(
    ("extra", "arrays"),
    [
        ({"tag_hub": {"bank": "missing", "weight": 0.5}}, {}),
        ({"tag_hub": {"bank": "hb", "weight": 0.5, "kind": "mystery"}}, {"hb": BANK}),
        ({"tag_hub": {"bank": "hb", "weight": 5.0}}, {"hb": BANK}),
        ({"tag_hub": {"bank": "hb", "weight": 0.5}}, {"hb": np.zeros((0, 2), np.float32)}),
        ({"tag_gate": {"signal": "vibes", "low": 0.1, "high": 0.2, "weight_out": 0, "weight_in": 1}}, {}),
        ({"tag_gate": {"signal": "conse_confidence", "low": 0.5, "high": 0.2, "weight_out": 0, "weight_in": 1}}, {}),
    ],
)
def test_malformed_specs_are_refused(tmp_path: Path, extra: dict[str, Any], arrays: dict[str, Any]) -> None:
    path = tmp_path / "bad.npz"
    _write(path, extra, arrays)
    conse = ConSEHead(class_embeddings=CLASSES, top_t=2)
    with pytest.raises(InvalidArgument):
        load_head(path, image_model="m@1", feature_dim=4, text_dim=2, conse=conse)
