"""Tiny end-to-end run on scikit-image photos: train, export, load with the tagger's load_head, tag."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from imgsearch.heads import load_head
from imgsearch.kit.errors import FailedPrecondition
from imgsearch.models.manifest import ModelManifest
from imgsearch.training.data import Prepared, prepare
from imgsearch.training.evaluate import retrieval_metrics, tagging_metrics
from imgsearch.training.model import export_head
from imgsearch.training.train import TrainConfig, build_trainset, train_and_export, train_model
from tests.conftest import sample_path

PHOTOS = {
    "chelsea.png": ("cat", "whiskers"),
    "coffee.png": ("coffee", "cup"),
    "astronaut.png": ("astronaut", "spacesuit"),
    "rocket.jpg": ("rocket", "launch"),
    "motorcycle_left.png": ("motorcycle", "wheel"),
    "horse.png": ("horse", "silhouette"),
}
TINY = TrainConfig(
    name="tiny",
    loss="infonce+fast0tag",
    epochs=60,
    batch_size=8,
    lr=1e-2,
    patience=60,
    conse_weight=0.0,
    flip_augment=False,
)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory, model_dir: Path) -> Prepared:
    root = tmp_path_factory.mktemp("tiny")
    rows = ["image,tags,split"]
    for name, tags in PHOTOS.items():
        shutil.copy(sample_path(name), root / name)
        # The same photos serve as the dev split: this checks the mechanics, not generalisation.
        rows += [f"{name},{';'.join(tags)},train", f"{name},{';'.join(tags)},dev"]
    (root / "tags.csv").write_text("\n".join(rows) + "\n")
    return prepare(root, model_dir, cache_dir=root / "cache", unseen_count=0, progress=False)


def test_prepare_reads_tags_and_real_features(tiny: Prepared) -> None:
    train = tiny.splits["train"]
    assert train.names == list(PHOTOS)
    assert sorted(tiny.vocabulary) == sorted(t for tags in PHOTOS.values() for t in tags)
    feats, logits = train.features.view("orig")
    assert feats.shape == (6, 1280) and logits.shape == (6, 1000)
    # The flipped view is a different image, so its features differ, but not by much.
    flipped, _ = train.features.view("flip")
    cos = (feats * flipped).sum(1) / np.linalg.norm(feats, axis=1) / np.linalg.norm(flipped, axis=1)
    assert np.all(cos > 0.8) and np.all(cos < 0.99999)
    # The served image model recognises the cat photo as a cat (ImageNet classes 281-285).
    assert 281 <= int(np.argmax(logits[0])) <= 285


def test_train_export_load_and_tag(tiny: Prepared, model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "tiny.npz"
    manifest = train_and_export(tiny, TINY, out, model_dir, progress=False)
    version = ModelManifest.load(model_dir).image_version
    head = load_head(out, image_model=version, feature_dim=1280, text_dim=384, conse=tiny.conse())
    assert head.name == "tiny" and head.image_model == version and manifest["image_model"] == version

    feats, _ = tiny.splits["train"].features.view("orig")
    images = head.project_images(feats, None)
    tags = head.project_texts(tiny.tag_embeddings)
    scores = images @ tags.T
    for i, own in enumerate(PHOTOS.values()):
        top = [tiny.vocabulary[j] for j in np.argsort(-scores[i])[: len(own)]]
        assert set(top) == set(own), f"image {i} ranks {top} first, expected {own}"

    metrics = {
        **retrieval_metrics(head, tiny.splits["dev"]),
        **tagging_metrics(head, tiny, tiny.splits["dev"], ("orig",)),
    }
    assert metrics["seen_hit@1"] == 100.0
    assert metrics["i2t_r1"] == 100.0


def test_head_refuses_another_image_model(tiny: Prepared, model_dir: Path, tmp_path: Path) -> None:
    model, _ = train_model(tiny, TrainConfig(epochs=1, batch_size=8), progress=False)
    out = tmp_path / "h.npz"
    export_head(out, model, {"name": "h", "image_model": tiny.image_model, "conse_weight": 0.0})
    with pytest.raises(FailedPrecondition):
        load_head(out, image_model="efficientnet-lite2@0123456789ab", feature_dim=1280, text_dim=384, conse=None)


@pytest.mark.parametrize(("kind", "half", "tol"), [("linear", False, 1e-5), ("mlp", True, 2e-2)])
def test_exported_head_matches_the_torch_model(
    tiny: Prepared, model_dir: Path, tmp_path: Path, kind: str, half: bool, tol: float
) -> None:
    cfg = TrainConfig(kind=kind, text_adapter=True, epochs=3, batch_size=4, conse_weight=0.0)
    model, _ = train_model(tiny, cfg, progress=False)
    out = tmp_path / f"{kind}.npz"
    export_head(out, model, {"name": kind, "image_model": tiny.image_model, "conse_weight": 0.0}, half=half)
    head = load_head(out, image_model=tiny.image_model, feature_dim=1280, text_dim=384, conse=None)
    feats, _ = tiny.splits["train"].features.view("orig")
    with torch.no_grad():
        want_img = model.images(torch.from_numpy(feats)).numpy()
        want_txt = model.texts(torch.from_numpy(tiny.tag_embeddings)).numpy()
    np.testing.assert_allclose(head.project_images(feats, None), want_img, atol=tol)
    np.testing.assert_allclose(head.project_texts(tiny.tag_embeddings), want_txt, atol=1e-5)
    # The adapter must have moved away from the identity for the text check to mean anything.
    assert not np.allclose(want_txt, tiny.tag_embeddings, atol=1e-4)


def test_holdout_removes_unseen_tags_from_training(tiny: Prepared) -> None:
    tiny_unseen = Prepared(**{**tiny.__dict__, "unseen": ["whiskers"]})
    full = build_trainset(tiny, TrainConfig())
    held = build_trainset(tiny_unseen, TrainConfig(holdout=True))
    texts = tiny.splits["train"].texts
    assert "whiskers" in [texts[t] for t in full.image_texts[0]]
    assert "whiskers" not in [texts[t] for ts in held.image_texts for t in ts]
    assert held.tag_mask.shape[1] == full.tag_mask.shape[1] - 1
    assert held.tags.shape[0] == len(tiny.vocabulary) - 1
