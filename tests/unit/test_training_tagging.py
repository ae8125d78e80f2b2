"""Served-vocabulary tag metrics on a tiny ranking whose answers are worked out by hand."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np

from imgsearch.heads import ConSEHead, l2_normalise, load_head, save_head
from imgsearch.training.tagging import (
    GateSpec,
    Setting,
    TagChoice,
    choose,
    fold,
    gate_bank,
    served_metrics,
    served_scores,
    served_truth,
    update_head,
)

NAMES = ["Cat", "kitten", "people", "coffee mug", "dog", "tabby cat"]
# Caption tags as imgsearch.training.text gives them: lower-case and plural-folded ("people" -> "person").
IMAGE_TAGS = [["cat", "person", "grass"], ["dog"], ["tree"]]
SCORES = np.array(
    [
        [0.1, 0.9, 0.8, 0.7, 0.6, 0.5],  # order: kitten, people+, coffee mug, dog, tabby cat, Cat+
        [0.2, 0.1, 0.0, 0.3, 0.9, 0.4],  # order: dog+, ...
        [0.9, 0.8, 0.7, 0.6, 0.5, 0.4],  # no true entry: not counted
    ],
    dtype=np.float32,
)


def test_fold_casefolds_and_singularises_single_words() -> None:
    assert fold("People") == "person"
    assert fold("Dogs") == "dog"
    assert fold("coffee mug") == "coffee mug"


def test_truth_matches_casefolded_and_plural_folded_entries() -> None:
    truth = served_truth(NAMES, IMAGE_TAGS)
    assert truth.tolist() == [
        [True, False, True, False, False, False],
        [False, False, False, False, True, False],
        [False] * 6,
    ]


def test_hand_computed_p5_hit1_miap() -> None:
    m = served_metrics(SCORES, served_truth(NAMES, IMAGE_TAGS))
    assert m["images"] == 2.0
    # Image 0: true entries at ranks 2 and 6; image 1: at rank 1. One true entry in each top 5.
    assert m["p@5"] == 20.0
    assert m["hit@1"] == 50.0
    assert np.isclose(m["miap"], 100.0 * ((1 / 2 + 2 / 6) / 2 + 1.0) / 2)


def test_scores_are_the_taggers_direction_plus_bias() -> None:
    rng = np.random.default_rng(0)
    classes = rng.normal(size=(4, 8)).astype(np.float32)
    classes /= np.linalg.norm(classes, axis=1, keepdims=True)
    head = ConSEHead(class_embeddings=classes, top_t=2, anchor_penalty=0.5)
    tags = rng.normal(size=(5, 8)).astype(np.float32)
    logits = rng.normal(size=(3, 4)).astype(np.float32)
    feats = np.zeros((3, 1), dtype=np.float32)
    projected = head.project_texts(tags)
    want = np.stack([projected @ head.tag_direction(feats[i : i + 1], logits[i : i + 1])[0] for i in range(3)])
    got = served_scores(head, feats, logits, tags)
    assert np.allclose(got, want + head.tag_bias(projected)[None, :], atol=1e-6)


def test_choose_takes_best_miap_among_passing_settings() -> None:
    settings = [
        Setting(0.1, 0.0, {"miap": 40.0}, {"passes": False}),
        Setting(0.5, 0.5, {"miap": 25.0}, {"passes": True}),
        Setting(0.6, 0.5, {"miap": 19.0}, {"passes": True}),
    ]
    best = choose(settings)
    assert best is not None and (best.weight, best.penalty) == (0.5, 0.5)
    assert choose(settings[:1]) is None


# A tiny bank (normalised on use) and learned directions whose mean cosine to their 2 nearest rows is known:
# cosines to the rows are (x0, x1, x2, -x0), so the score is the mean of the two largest of those.
BANK = np.array([[2, 0, 0], [0, 3, 0], [0, 0, 1], [-1, 0, 0]], dtype=np.float32)
LEARNED = np.array(
    [
        [0.0, 0.0, -1.0],  # cosines 0, 0, -1, 0 -> score 0.0 (below low)
        [0.0, 0.6, -0.8],  # 0, .6, -.8, 0 -> 0.3 (at low)
        [0.0, 0.8, -0.6],  # 0, .8, -.6, 0 -> 0.4 (half-way)
        [0.0, 1.0, 0.0],  # 0, 1, 0, 0 -> 0.5 (at high)
        [0.6, 0.0, 0.8],  # .6, 0, .8, -.6 -> 0.7 (above high)
    ],
    dtype=np.float32,
)


def test_gate_ramps_from_weight_out_to_weight_in() -> None:
    gate = GateSpec(k=2, low=0.3, high=0.5, weight_out=0.6, weight_in=0.2).gate(BANK)
    assert np.allclose(gate.scores(LEARNED), [0.0, 0.3, 0.4, 0.5, 0.7], atol=1e-6)
    assert np.allclose(gate.weights(LEARNED), [0.6, 0.6, 0.4, 0.2, 0.2], atol=1e-6)
    # k = 1: the nearest row alone (scores 0, .6, .8, 1, .8), all at or above high but the first.
    one = GateSpec(k=1, low=0.3, high=0.5, weight_out=0.6, weight_in=0.2).gate(BANK)
    assert np.allclose(one.weights(LEARNED), [0.6, 0.2, 0.2, 0.2, 0.2], atol=1e-6)


def test_gate_bank_takes_one_projected_caption_per_image() -> None:
    rng = np.random.default_rng(1)
    emb = rng.normal(size=(7, 4)).astype(np.float32)
    split = SimpleNamespace(image_texts=lambda: [[0, 1], [2], [3, 4, 5], [6]], text_embeddings=emb)
    head = ConSEHead(class_embeddings=np.eye(4, dtype=np.float32))
    bank = gate_bank(head, split, size=3, seed=0)  # type: ignore[arg-type]
    assert bank.dtype == np.float16 and bank.shape == (3, 4)
    assert np.allclose(np.linalg.norm(bank.astype(np.float32), axis=1), 1.0, atol=1e-3)
    owners = {0: 0, 1: 0, 2: 1, 3: 2, 4: 2, 5: 2, 6: 3}
    unit = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    rows = [int(np.argmax(unit @ b.astype(np.float32))) for b in bank]
    assert len({owners[r] for r in rows}) == 3
    assert np.array_equal(bank, gate_bank(head, split, size=3, seed=0))  # type: ignore[arg-type]
    assert gate_bank(head, split, size=10).shape == (4, 4)  # type: ignore[arg-type]


def test_update_head_stores_the_gate_and_load_head_uses_it(tmp_path: Path) -> None:
    path = tmp_path / "head.npz"
    rng = np.random.default_rng(2)
    manifest = {
        "name": "tiny",
        "version": "7",
        "image_model": "m@1",
        "feature_dim": 4,
        "text_dim": 3,
        "conse_weight": 0.2,
        "tag_conse_weight": 0.5,
        "image_layers": [{"weight": "w", "bias": "b", "activation": "none"}],
    }
    arrays = {"w": rng.normal(size=(4, 3)).astype(np.float32), "b": np.zeros(3, np.float32)}
    save_head(path, manifest, arrays)
    spec = GateSpec(k=2, low=0.3, high=0.5, weight_out=0.6, weight_in=0.2)
    update_head(path, TagChoice(None, 0.75, spec, BANK.astype(np.float16), []))
    conse = ConSEHead(class_embeddings=np.eye(3, dtype=np.float32), top_t=2)
    head = load_head(path, image_model="m@1", feature_dim=4, text_dim=3, conse=conse)
    assert head.version == "7" and head.conse_weight == 0.2 and head.tag_conse_weight is None
    assert head.tag_anchor_penalty == 0.75 and head.tag_gate is not None
    assert head.tag_gate.k == 2 and head.tag_gate.weight_out == 0.6 and head.tag_gate.bank.shape == (4, 3)
    feats, logits = rng.normal(size=(5, 4)).astype(np.float32), rng.normal(size=(5, 3)).astype(np.float32)
    learned = l2_normalise(feats @ arrays["w"])
    w = head.tag_gate.weights(learned)[:, None]
    want = l2_normalise(w * conse.project_images(feats, logits) + (1 - w) * learned)
    assert np.allclose(head.tag_direction(feats, logits), want, atol=1e-5)
    # A fixed setting afterwards drops the gate and its bank.
    update_head(path, TagChoice(0.5, 0.75, None, None, []))
    fixed = load_head(path, image_model="m@1", feature_dim=4, text_dim=3, conse=conse)
    assert fixed.tag_gate is None and fixed.tag_conse_weight == 0.5
    with np.load(path) as data:
        assert "tag_gate_bank" not in data.files and {"w", "b"} <= set(data.files)
