"""Tiny run of the partial fine-tuning path on scikit-image photos: cache, train, export, parity, reload."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from imgsearch.training.finetune import (
    Corpus,
    FinetuneConfig,
    PairModel,
    check_export,
    export_models,
    load_corpus,
    load_run,
    run_path,
    save_run,
    train,
)
from tests.conftest import sample_path

PHOTOS = {
    "chelsea.png": "a cat with long whiskers lying down",
    "coffee.png": "a cup of coffee on a saucer",
    "astronaut.png": "an astronaut in a white spacesuit",
    "rocket.jpg": "a rocket on its launch pad",
    "motorcycle_left.png": "a red motorcycle seen from the side",
    "horse.png": "the silhouette of a horse",
}
# Only the last image block and the last MiniLM layer train; caches start one block/layer earlier so the
# step that advances them through the frozen block/layer runs too.
TINY = FinetuneConfig(
    name="tiny",
    cache_block=14,
    image_train_from=15,
    cache_layer=4,
    text_train_from=5,
    epochs=2,
    batch_size=4,
    patience=2,
    dropout=0.0,
)


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("flickr-tiny")
    (root / "images").mkdir()
    (root / "splits").mkdir()
    rows = ["image,caption"]
    for name, caption in PHOTOS.items():
        shutil.copy(sample_path(name), root / "images" / name)
        rows += [f"{name},{caption}", f"{name},{caption.replace('a ', 'one ', 1)}"]
    (root / "captions.csv").write_text("\n".join(rows) + "\n")
    names = list(PHOTOS)
    # The same photos serve as every split: this checks the mechanics, not generalisation.
    for split in ("train", "dev", "test"):
        (root / "splits" / f"{split}.txt").write_text("\n".join(names) + "\n")
    return root


@dataclasses.dataclass
class Trained:
    cfg: FinetuneConfig
    model: PairModel
    info: dict[str, Any]
    corpus: Corpus
    cache: Path


@pytest.fixture(scope="module")
def trained(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Trained:
    torch.set_num_threads(2)
    cache = tmp_path_factory.mktemp("ft-cache")
    corpus = load_corpus(tiny_data, TINY, cache)
    model, info = train(TINY, corpus, progress=False)
    return Trained(TINY, model, info, corpus, cache)


def test_cache_train_and_reload(trained: Trained, tiny_data: Path) -> None:
    corpus = trained.corpus
    n = len(PHOTOS) * 3  # every photo is in all three splits
    assert len(corpus.acts) == 2 and corpus.acts[0].shape[0] == n and corpus.acts[0].dtype == np.float16
    assert len(corpus.text.offsets) == 2 * n + 1
    # Cached states are reused, not recomputed.
    again = load_corpus(tiny_data, TINY, trained.cache)
    np.testing.assert_array_equal(again.text.hidden, corpus.text.hidden)

    info = trained.info
    assert 1 <= len(info["history"]) <= TINY.epochs
    assert all(np.isfinite(h["loss"]) for h in info["history"])
    # Frozen parts ran once into the advanced caches; only the upper blocks/layers and the head train.
    model = trained.model
    blocks, layers = model.image_tail.blocks, model.text_tail.layers
    assert isinstance(blocks, torch.nn.ModuleList) and isinstance(layers, torch.nn.ModuleList)
    assert len(blocks) == 1 and len(layers) == 1
    assert all(p.requires_grad for p in layers.parameters())

    path = run_path(trained.cache, TINY.name)
    save_run(path, TINY, model, info)
    cfg, reloaded, _ = load_run(path)
    assert cfg == TINY
    for a, b in zip(model.state_dict().values(), reloaded.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.slow
def test_export_parity_and_retrieval(trained: Trained, tiny_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "export"
    manifest = export_models(trained.cfg, trained.model, out, Path("models"))
    assert (out / manifest.image_file).exists() and (out / manifest.text_file).exists()
    report = check_export(trained.cfg, trained.model, out, tiny_data, count=6)
    assert report["parity_features_max_abs"] < 1e-3
    assert report["parity_text_max_abs"] < 1e-4
    assert report["parity_logits_max_abs"] < 1e-2
    assert report["train_vs_export_features_max_abs"] < 1e-3 * max(report["feature_abs_max"], 1.0)
    assert 0.0 <= report["test"]["r1"] <= report["test"]["r10"] <= 100.0


def test_config_is_recorded_whole() -> None:
    fields = {f.name for f in dataclasses.fields(FinetuneConfig)}
    assert {"cache_block", "image_train_from", "cache_layer", "text_train_from", "loss"} <= fields
