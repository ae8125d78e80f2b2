"""Served-vocabulary tag metrics on a tiny ranking whose answers are worked out by hand."""

from __future__ import annotations

import numpy as np

from imgsearch.tagger.heads import ConSEHead
from imgsearch.training.tagging import Setting, choose, fold, served_metrics, served_scores, served_truth

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
