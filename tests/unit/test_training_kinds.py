"""By-kind tag evaluation, the photo-kind gate's fitting and the starter vocabulary's short names, by hand."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from imgsearch.heads import read_head_manifest, save_head
from imgsearch.tagger.core import short_name, starter_vocabulary
from imgsearch.training.kinds import annotate
from imgsearch.training.objects import ObjectSet, hits_at, hubness, object_truth
from imgsearch.training.photo_gate import Setting, class_halves, fit_logistic, grid


def test_object_truth_folds_names_and_tags() -> None:
    truth = object_truth(["Dogs", "cat", "coffee mug", "dog"], [["dog", "puppy"], ["Coffee mug"], ["horse"]])
    assert truth.tolist() == [[True, False, False, True], [False, False, True, False], [False] * 4]


def test_hits_count_every_photo_and_hubness_finds_the_crowding_tag() -> None:
    scores = np.array([[0.9, 0.1, 0.5], [0.2, 0.8, 0.7], [0.3, 0.2, 0.1]], np.float32)
    truth = np.array([[True, False, False], [False, False, True], [False, False, False]])
    # Photo 0: right at rank 1; photo 1: rank 2; photo 2: no right tag at all (a miss, not dropped).
    hits = hits_at(scores, truth, (1, 2))
    assert np.isclose(hits["hit@1"], 100 / 3) and np.isclose(hits["hit@2"], 200 / 3)
    # Top 2 per photo: {0, 2}, {1, 2}, {0, 1}: each tag twice, so no hub and no skew.
    h = hubness(scores, k=2)
    assert np.isclose(h["top_hub_share"], 200 / 3) and np.isclose(h["nk_skew"], 0.0)
    # Top 1: tag 0 twice, tag 1 once, tag 2 never: N1 = (2, 1, 0), skewness 0.
    assert np.isclose(hubness(scores, k=1)["top_hub_share"], 200 / 3)


def test_logistic_fit_separates_and_balances_classes() -> None:
    rng = np.random.default_rng(0)
    neg = rng.normal(size=(200, 3)).astype(np.float32) - np.array([2, 0, 0], np.float32)
    pos = rng.normal(size=(20, 3)).astype(np.float32) + np.array([2, 0, 0], np.float32)
    w, b = fit_logistic(np.vstack([neg, pos]), np.r_[np.zeros(200), np.ones(20)], l2=1.0)
    assert w[0] > 1.0 and abs(w[1]) < 0.5 and abs(w[2]) < 0.5
    # Balanced weights put the boundary near the midpoint of the two means despite 10:1 counts.
    assert abs(b) < 0.5
    assert ((neg @ w + b) < 0).mean() > 0.95 and ((pos @ w + b) > 0).mean() > 0.9


def test_class_halves_split_by_class_with_a_seed() -> None:
    names = [[c] for c in "aabbccdd"]
    objects = ObjectSet(
        "toy", [f"{i}.jpg" for i in range(8)], names, np.zeros((8, 2), np.float32), np.zeros((8, 3), np.float32)
    )
    mask = class_halves(objects, seed=0)
    assert mask.sum() == 4 and all(mask[i] == mask[i + 1] for i in range(0, 8, 2))
    assert np.array_equal(mask, class_halves(objects, seed=0))


def test_short_names_replace_glosses_and_merge_duplicates() -> None:
    assert short_name("a cat having a striped coat") == "tabby cat"
    assert short_name("tights for gymnastics, a one-piece leotard, or a sport jersey") == "leotard"
    assert short_name("kite (bird of prey)") == "kite"
    assert short_name("cardboard box / carton") == "cardboard box"
    assert short_name("red wolf or maned wolf") == "red wolf"
    assert short_name("Greater Swiss Mountain Dog") == "Greater Swiss Mountain Dog"
    labels = ["tabby cat", "a cat having a striped coat", "kite (bird of prey)", "missile", "missile"]
    vocab = starter_vocabulary(labels)
    assert vocab[:3] == ["tabby cat", "kite", "missile"]
    assert not [v for v in vocab if "(" in v or "," in v or " / " in v]


def test_annotate_stores_description_and_prefixed_numbers(tmp_path: Path) -> None:
    path = tmp_path / "h.npz"
    save_head(
        path, {"name": "h", "metrics": {"dev_t2i_r10": 60.0, "kinds_test_old": 1.0}}, {"w": np.eye(2, dtype=np.float32)}
    )
    annotate(path, "scenes and people", {"flickr_miap": 40.123, "t2i_r10": 67.0}, "kinds_test")
    m = read_head_manifest(path)
    assert m["description"] == "scenes and people"
    assert m["metrics"] == {"dev_t2i_r10": 60.0, "kinds_test_flickr_miap": 40.12, "kinds_test_t2i_r10": 67.0}
    with np.load(path) as data:
        assert np.array_equal(data["w"], np.eye(2)) and json.loads(bytes(data["manifest"]).decode())["name"] == "h"


def test_settings_round_trip_through_json_with_their_mix() -> None:
    chosen = grid()[0]
    assert chosen.mix is not None and chosen.knn_low is not None
    again = Setting.from_dict(json.loads(json.dumps(dataclasses.asdict(chosen))))
    assert again == chosen and "raw anchor penalty" in again.label()
    assert Setting.from_dict(dataclasses.asdict(grid(mixed=False)[0])).mix is None
