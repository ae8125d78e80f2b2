"""Image features/logits and text embeddings through the served ONNX models, cached under training/cache."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from imgsearch.models.runtime import CPU, ImageModel, Pixels, RuntimeOptions, TextModel
from imgsearch.models.runtime import Matrix as Matrix
from imgsearch.training.datasets import Sample

log = logging.getLogger(__name__)


CACHE_DIR = Path(__file__).resolve().parents[2] / "cache"
# "orig" is what the service computes; "flip" is the horizontal mirror, for test-time averaging and
# as free training-time augmentation.
VIEWS = ("orig", "flip")


def training_options(threads: int = 0) -> RuntimeOptions:
    """The encoder's session options, on CPU: cached features must not depend on which machine made them."""
    return RuntimeOptions(providers=(CPU,), intra_op_threads=threads)


@dataclass
class ImageFeatures:
    """Per-view pooled features [V, N, 1280] and ImageNet logits [V, N, 1000] for the images in order."""

    names: list[str]
    views: tuple[str, ...]
    features: Matrix
    logits: Matrix

    def view(self, name: str) -> tuple[Matrix, Matrix]:
        i = self.views.index(name)
        return self.features[i], self.logits[i]

    def averaged(self, views: Sequence[str]) -> tuple[Matrix, Matrix]:
        """Test-time augmentation: the mean of the chosen views' features and logits."""
        idx = [self.views.index(v) for v in views]
        return self.features[idx].mean(axis=0), self.logits[idx].mean(axis=0)


class OnnxImageModel(ImageModel):
    """The served image model through the shared runtime: decoded exactly as the encoder decodes."""

    def __init__(self, model_dir: Path, threads: int = 0) -> None:
        super().__init__(model_dir, training_options(threads))

    def decode(self, path: Path) -> Pixels:
        return self.preprocess_file(path)


def compute_image_features(
    model: OnnxImageModel,
    paths: Sequence[Path],
    views: Sequence[str] = VIEWS,
    batch: int = 32,
    progress: bool = True,
) -> ImageFeatures:
    """Run every image (and its flipped copy if asked) through the model, batch by batch."""
    feats = np.zeros((len(views), len(paths), model.manifest.feature_dim), dtype=np.float32)
    logits = np.zeros((len(views), len(paths), model.manifest.num_classes), dtype=np.float32)
    with ThreadPoolExecutor(max_workers=2) as pool:
        starts = range(0, len(paths), batch)
        for start in tqdm(starts, desc="image features", unit="batch", disable=not progress):
            chunk = paths[start : start + batch]
            pixels = np.stack(list(pool.map(model.decode, chunk)))
            for v, view in enumerate(views):
                x = pixels if view == "orig" else np.ascontiguousarray(pixels[:, :, ::-1, :])
                f, lg = model.run(x)
                feats[v, start : start + len(chunk)] = f
                logits[v, start : start + len(chunk)] = lg
    return ImageFeatures([p.name for p in paths], tuple(views), feats, logits)


def cached_image_features(
    model_dir: Path,
    samples: Sequence[Sample],
    dataset_key: str,
    cache_dir: Path = CACHE_DIR,
    views: Sequence[str] = VIEWS,
) -> ImageFeatures:
    """Features for `samples`, computed once per (image model version, dataset) and read from disk after."""
    model = OnnxImageModel(model_dir)
    path = cache_dir / "features" / f"{dataset_key}--{model.version.replace('@', '-')}.npz"
    names = [s.image.name for s in samples]
    if path.exists():
        with np.load(path, allow_pickle=False) as data:
            cached_views = tuple(str(v) for v in data["views"])
            if [str(n) for n in data["names"]] == names and set(views) <= set(cached_views):
                return ImageFeatures(names, cached_views, data["features"], data["logits"])
        log.info("feature cache %s is stale, recomputing", path.name)
    out = compute_image_features(model, [s.image for s in samples], views)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, names=np.array(names), views=np.array(out.views), features=out.features, logits=out.logits)
    tmp.replace(path)
    return out


class OnnxTextModel(TextModel):
    """The served text model (MiniLM, mean-pooled, L2-normalised) through the shared runtime."""

    def __init__(self, model_dir: Path, threads: int = 0) -> None:
        super().__init__(model_dir, training_options(threads))


def _texts_key(texts: Sequence[str]) -> str:
    return hashlib.sha256(json.dumps(list(texts)).encode("utf-8")).hexdigest()[:16]


def cached_text_embeddings(
    model: OnnxTextModel, texts: Sequence[str], what: str, cache_dir: Path = CACHE_DIR, progress: bool = True
) -> Matrix:
    """Embeddings of `texts`, cached by text model version and the exact list of texts."""
    path = cache_dir / "text" / f"{what}--{model.version.replace('@', '-')}--{_texts_key(texts)}.npy"
    if path.exists():
        return np.load(path).astype(np.float32, copy=False)
    out = model.encode(texts, progress=progress)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npy")
    np.save(tmp, out)
    tmp.replace(path)
    return out


def idf_weights(documents: Sequence[Sequence[str]]) -> dict[str, float]:
    """Smoothed inverse document frequency log((1 + N) / (1 + df)) + 1 of each word."""
    df: dict[str, int] = {}
    for doc in documents:
        for w in set(doc):
            df[w] = df.get(w, 0) + 1
    n = len(documents)
    return {w: float(np.log((1 + n) / (1 + c)) + 1.0) for w, c in df.items()}


def bag_of_words(
    documents: Sequence[Sequence[str]], word_vectors: dict[str, Matrix], idf: dict[str, float], dim: int
) -> Matrix:
    """IDF-weighted mean of word embeddings per document, L2-normalised (zeros for a document with no known word)."""
    out = np.zeros((len(documents), dim), dtype=np.float32)
    for i, doc in enumerate(documents):
        words = [w for w in doc if w in word_vectors]
        if not words:
            continue
        weights = np.array([idf.get(w, 1.0) for w in words], dtype=np.float32)
        vec = (weights[:, None] * np.stack([word_vectors[w] for w in words])).sum(axis=0)
        out[i] = vec / max(float(np.linalg.norm(vec)), 1e-12)
    return out
