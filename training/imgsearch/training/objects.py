"""Object-photo sets (Imagenette, Caltech-101): served features and tag hit@k over the served vocabulary.

Each set is a folder with images/ and labels.csv (file, an id column, names separated by `|`). The photo's
class is right when one of the top-k tags, as the tagger ranks the vocabulary, folds to one of its names.
Class names missing from the starter vocabulary can be added as unseen tags (as an operator adds tags live).
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from imgsearch.heads import Head
from imgsearch.training.datasets import Sample, fingerprint
from imgsearch.training.features import CACHE_DIR, Matrix, cached_image_features
from imgsearch.training.tagging import fold

OBJECT_SETS = ("imagenette", "caltech101")


@dataclass
class ObjectSet:
    """Photos of one set: served features and logits (view "orig"), and each photo's class names."""

    name: str
    files: list[str]
    names: list[list[str]]
    features: Matrix
    logits: Matrix

    def class_names(self) -> list[str]:
        """Every distinct first-listed name (the object's name), in order of appearance."""
        return list(dict.fromkeys(n[0] for n in self.names if n))


def read_labels(root: Path) -> tuple[list[str], list[list[str]]]:
    files: list[str] = []
    names: list[list[str]] = []
    with (root / "labels.csv").open(newline="", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            files.append(row["file"])
            names.append([n.strip() for n in row["names"].split("|") if n.strip()])
    return files, names


def load_object_set(root: Path, model_dir: Path, cache_dir: Path = CACHE_DIR) -> ObjectSet:
    """Features of every photo (computed once through the served image model, then cached)."""
    files, names = read_labels(root)
    samples = [Sample(root / "images" / f, tuple(n), "test") for f, n in zip(files, names, strict=True)]
    feats = cached_image_features(model_dir, samples, f"{root.name}-{fingerprint(samples)}", cache_dir, ("orig",))
    f, lg = feats.view("orig")
    return ObjectSet(root.name, files, names, f, lg)


def object_truth(tags: Sequence[str], names: Sequence[Sequence[str]]) -> npt.NDArray[np.bool_]:
    """[photos, tags]: the tag, folded, equals one of the photo's class names, folded (`tagging.fold`)."""
    keys = [fold(t) for t in tags]
    truth = np.zeros((len(names), len(keys)), dtype=bool)
    index: dict[str, list[int]] = {}
    for j, k in enumerate(keys):
        index.setdefault(k, []).append(j)
    for i, ns in enumerate(names):
        for n in ns:
            for j in index.get(fold(n), []):
                truth[i, j] = True
    return truth


def hits_at(scores: Matrix, truth: npt.NDArray[np.bool_], ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """hit@k in percent over every photo (a photo whose class has no tag in the vocabulary counts as a miss)."""
    order = np.argsort(-scores, axis=1, kind="stable")
    rel = np.take_along_axis(truth, order, axis=1)
    return {f"hit@{k}": float(100.0 * rel[:, :k].any(axis=1).mean()) for k in ks}


def hubness(scores: Matrix, k: int = 5) -> dict[str, float]:
    """How much a few tags dominate the top k: the share of photos whose top k hold the most frequent tag,
    and the skewness of the k-occurrence distribution N_k over tags (Radovanovic et al. 2010)."""
    top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    counts = np.bincount(top.ravel(), minlength=scores.shape[1]).astype(np.float64)
    sd = counts.std()
    skew = float(((counts - counts.mean()) ** 3).mean() / sd**3) if sd > 0 else 0.0
    return {"top_hub_share": float(100.0 * counts.max() / scores.shape[0]), "nk_skew": skew}


def head_scores(head: Head, features: Matrix, logits: Matrix, tags: Matrix) -> Matrix:
    """[photos, tags] scores as `Tagger.rank` computes them."""
    projected = head.project_texts(tags)
    direction = head.tag_direction(features, logits if head.needs_logits else None)
    return (direction @ projected.T + head.tag_bias(projected)[None, :]).astype(np.float32)
