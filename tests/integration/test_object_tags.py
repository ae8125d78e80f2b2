"""Natural object photos' top tags name the object, under the served default head (no ../shared needed).

The photos bundled with scikit-image, decoded and encoded by the served models (models/), tag the served
starter vocabulary exactly as the tagger ranks it (`imgsearch.training.tagging.served_scores`: the head's
tag direction . projected tags + its tag bias), with heads/default.npz and the tagger's ConSE head.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from imgsearch.heads import ConSEHead, LearnedHead, load_head
from imgsearch.models.manifest import ModelManifest
from imgsearch.training.features import OnnxImageModel, OnnxTextModel
from imgsearch.training.photo_gate import PHOTO_TAGS, PHOTO_TOP
from imgsearch.training.tagging import fold, served_scores
from tests.conftest import sample_path

HEAD = Path(__file__).resolve().parents[2] / "heads" / "default.npz"
# Each photo and the tags that name its object (the astronaut: the person and her helmet count too, no model
# here names "astronaut"); at least one must be among its top PHOTO_TOP tags. photo_gate selects with the same.
PHOTOS = PHOTO_TAGS
TOP = PHOTO_TOP


@pytest.fixture(scope="module")
def ranked(model_dir: Path) -> dict[str, list[str]]:
    """Top tags of every photo under the served default head, over the starter vocabulary."""
    from imgsearch.tagger.core import starter_vocabulary

    manifest = ModelManifest.load(model_dir)
    labels = [str(x) for x in json.loads((model_dir / manifest.labels_file).read_text())]
    text = OnnxTextModel(model_dir)
    conse = ConSEHead(class_embeddings=text.encode(labels), image_model=manifest.image_version)
    head = load_head(HEAD, image_model=manifest.image_version, feature_dim=1280, text_dim=384, conse=conse)
    names = starter_vocabulary(labels)
    image = OnnxImageModel(model_dir)
    feats, logits = image.run(np.stack([image.decode(sample_path(p)) for p in PHOTOS]))
    scores = served_scores(head, feats, logits, text.encode(names))
    return {p: [names[j] for j in np.argsort(-scores[i], kind="stable")[:10]] for i, p in enumerate(PHOTOS)}


@pytest.mark.parametrize("photo", list(PHOTOS))
def test_top_tags_name_the_object(ranked: dict[str, list[str]], photo: str) -> None:
    right = {fold(t) for t in PHOTOS[photo]}
    top = ranked[photo][:TOP]
    assert any(fold(t) in right for t in top), f"{photo}: top {TOP} tags {top}"


def test_the_default_head_gates_by_kind_of_photo_and_says_what_it_is_for(model_dir: Path) -> None:
    manifest = ModelManifest.load(model_dir)
    conse = ConSEHead(class_embeddings=np.eye(1000, 384, dtype=np.float32), image_model=manifest.image_version)
    head = load_head(HEAD, image_model=manifest.image_version, feature_dim=1280, text_dim=384, conse=conse)
    assert isinstance(head, LearnedHead) and head.tag_gate is not None and head.tag_hub is not None
    assert head.tag_gate.signal == "linear" and "object" in str(head.manifest.get("description", ""))
    assert head.tag_gate_max is not None and head.tag_gate_max.signal == "knn"
