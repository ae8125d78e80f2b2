"""Everything training and evaluation need from a dataset: features, caption embeddings, tags, splits."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import numpy.typing as npt

from imgsearch.heads import ConSEHead
from imgsearch.training.datasets import SPLITS, fingerprint, open_dataset
from imgsearch.training.features import (
    CACHE_DIR,
    ImageFeatures,
    Matrix,
    OnnxTextModel,
    bag_of_words,
    cached_image_features,
    cached_text_embeddings,
    idf_weights,
)
from imgsearch.training.text import build_vocabulary, content_words, image_tags

log = logging.getLogger(__name__)

MIN_TAG_IMAGES = 5


@dataclass
class SplitData:
    """One split: images (features per view), their texts and which image each text belongs to."""

    names: list[str]
    features: ImageFeatures
    texts: list[str]
    text_image: npt.NDArray[np.int64]
    text_embeddings: Matrix
    bow_embeddings: Matrix
    tags: list[list[str]]

    def image_texts(self) -> list[list[int]]:
        """Indices of each image's texts."""
        out: list[list[int]] = [[] for _ in self.names]
        for t, i in enumerate(self.text_image):
            out[int(i)].append(t)
        return out


@dataclass
class Prepared:
    """A dataset made ready: splits, tag vocabulary from the training split, held-out (unseen) tags."""

    name: str
    kind: str
    image_model: str
    text_model: str
    splits: dict[str, SplitData]
    vocabulary: list[str]
    tag_embeddings: Matrix
    unseen: list[str]
    class_embeddings: Matrix
    word_vectors: dict[str, Matrix] = field(default_factory=dict)

    @property
    def seen(self) -> list[str]:
        held = set(self.unseen)
        return [t for t in self.vocabulary if t not in held]

    def tag_matrix(self, tags: list[str]) -> Matrix:
        index = {t: i for i, t in enumerate(self.vocabulary)}
        return self.tag_embeddings[[index[t] for t in tags]]

    def conse(self) -> ConSEHead:
        """The training-free ConSE head, built the way the tagger builds it (class names through MiniLM)."""
        return ConSEHead(class_embeddings=self.class_embeddings, image_model=self.image_model)


def select_unseen(tag_lists: list[list[str]], vocabulary: list[str], count: int, seed: int) -> list[str]:
    """Tags held out of training: `count` vocabulary words drawn at random (fixed seed) among mid-frequency ones.

    The frequent words (man, dog, ...: more than 200 training images) stay seen because holding them out
    would remove much of the training data; words of fewer than 20 images are too rare to evaluate
    reliably. Words ending in -ing/-ed/-ly are mostly verbs and adverbs, not things a tag names.
    """
    counts: dict[str, int] = {}
    for tags in tag_lists:
        for t in set(tags):
            counts[t] = counts.get(t, 0) + 1
    pool = [t for t in vocabulary if 20 <= counts.get(t, 0) <= 200 and not t.endswith(("ing", "ed", "ly"))]
    rng = np.random.default_rng(seed)
    picked = rng.choice(len(pool), size=min(count, len(pool)), replace=False)
    return sorted(pool[i] for i in picked)


def prepare(
    data: Path,
    model_dir: Path,
    cache_dir: Path = CACHE_DIR,
    unseen_count: int = 40,
    unseen_seed: int = 0,
    progress: bool = True,
) -> Prepared:
    """Read the dataset, compute (or load cached) features and embeddings, build the tag vocabulary."""
    reader = open_dataset(data)
    samples = list(reader.samples())
    key = f"{reader.name}-{fingerprint(samples)}"
    feats = cached_image_features(model_dir, samples, key, cache_dir)
    text_model = OnnxTextModel(model_dir)
    all_texts = [t for s in samples for t in s.texts]
    text_emb = cached_text_embeddings(text_model, all_texts, f"{key}-texts", cache_dir, progress=progress)
    sample_tags = [image_tags(s.texts, reader.kind) for s in samples]
    train_tags = [t for s, t in zip(samples, sample_tags, strict=True) if s.split == "train"]
    vocabulary = build_vocabulary(train_tags, MIN_TAG_IMAGES if len(train_tags) >= 100 else 1)
    unseen = select_unseen(train_tags, vocabulary, unseen_count, unseen_seed) if unseen_count else []

    # Word vectors (the text model on each single word) serve as tag embeddings and for bag-of-words.
    words = sorted({w for s in samples for t in s.texts for w in content_words(t)} | set(vocabulary))
    word_emb = cached_text_embeddings(text_model, words, f"{key}-words", cache_dir, progress=progress)
    word_vectors = dict(zip(words, word_emb, strict=True))
    tag_embeddings = np.stack([word_vectors[t] for t in vocabulary]) if vocabulary else np.zeros((0, 384), np.float32)
    docs = [content_words(t) for t in all_texts]
    train_docs = [d for s, d in zip((s for s in samples for _ in s.texts), docs, strict=True) if s.split == "train"]
    bow = bag_of_words(docs, word_vectors, idf_weights(train_docs), text_model.manifest.text_dim)

    labels = json.loads((model_dir / text_model.manifest.labels_file).read_text())
    class_emb = cached_text_embeddings(text_model, labels, "imagenet-labels", cache_dir, progress=progress)

    splits: dict[str, SplitData] = {}
    offsets = np.cumsum([0] + [len(s.texts) for s in samples])
    for split in SPLITS:
        idx = [i for i, s in enumerate(samples) if s.split == split]
        if not idx:
            continue
        text_idx = np.concatenate([np.arange(offsets[i], offsets[i + 1]) for i in idx])
        text_image = np.concatenate([np.full(len(samples[i].texts), j) for j, i in enumerate(idx)]).astype(np.int64)
        splits[split] = SplitData(
            names=[samples[i].image.name for i in idx],
            features=ImageFeatures(
                [samples[i].image.name for i in idx], feats.views, feats.features[:, idx], feats.logits[:, idx]
            ),
            texts=[all_texts[t] for t in text_idx],
            text_image=text_image,
            text_embeddings=text_emb[text_idx],
            bow_embeddings=bow[text_idx],
            tags=[sample_tags[i] for i in idx],
        )
    manifest = text_model.manifest
    return Prepared(
        name=reader.name,
        kind=reader.kind,
        image_model=manifest.image_version,
        text_model=manifest.text_version,
        splits=splits,
        vocabulary=vocabulary,
        tag_embeddings=tag_embeddings.astype(np.float32),
        unseen=unseen,
        class_embeddings=class_emb,
        word_vectors=word_vectors,
    )
