"""Retrieval and tag-ranking metrics on score matrices (numpy)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

Matrix = npt.NDArray[np.float32]
Ints = npt.NDArray[np.int64]


def target_ranks(scores: Matrix, target: Ints) -> Ints:
    """1-based rank of each query's target column: 1 + the number of columns scoring strictly higher."""
    own = scores[np.arange(scores.shape[0]), target]
    return (1 + (scores > own[:, None]).sum(axis=1)).astype(np.int64)


def best_of_ranks(scores: Matrix, targets: Sequence[Sequence[int]]) -> Ints:
    """1-based rank of the best-scoring of several targets per query (image->text with 5 captions each)."""
    ranks = np.empty(scores.shape[0], dtype=np.int64)
    for i, cols in enumerate(targets):
        best = scores[i, list(cols)].max()
        ranks[i] = 1 + int((scores[i] > best).sum())
    return ranks


def recall_at(ranks: Ints, k: int) -> float:
    """Percentage of queries whose target is within the top k."""
    return float(100.0 * np.mean(ranks <= k))


def median_rank(ranks: Ints) -> float:
    return float(np.median(ranks))


def triplet_accuracy(scores: Matrix, target: Ints) -> float:
    """Percentage of (query, positive, negative) triplets, over every negative column, ranked correctly."""
    own = scores[np.arange(scores.shape[0]), target]
    below = (scores < own[:, None]).sum(axis=1)
    return float(100.0 * below.sum() / (scores.shape[0] * (scores.shape[1] - 1)))


def average_precision(scores: Matrix, truth: npt.NDArray[np.bool_]) -> Matrix:
    """Per-row average precision of ranking the columns by score; rows with no positive give NaN."""
    order = np.argsort(-scores, axis=1, kind="stable")
    rel = np.take_along_axis(truth, order, axis=1).astype(np.float64)
    hits = np.cumsum(rel, axis=1)
    precision = hits / np.arange(1, scores.shape[1] + 1)
    n_pos = rel.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        ap = (precision * rel).sum(axis=1) / n_pos
    return ap.astype(np.float32)


def tag_metrics(scores: Matrix, truth: npt.NDArray[np.bool_], ks: Sequence[int] = (1, 3, 5)) -> dict[str, float]:
    """Image-centric tag ranking: hit@k, precision@k and MiAP (mean per-image AP), in percent.

    Only images with at least one true tag among the columns count; `images` says how many did.
    """
    keep = truth.any(axis=1)
    scores, truth = scores[keep], truth[keep]
    out: dict[str, float] = {"images": float(keep.sum()), "tags": float(scores.shape[1])}
    if not keep.any():
        return out
    order = np.argsort(-scores, axis=1, kind="stable")
    rel = np.take_along_axis(truth, order, axis=1)
    for k in ks:
        top = rel[:, :k]
        out[f"hit@{k}"] = float(100.0 * top.any(axis=1).mean())
        out[f"p@{k}"] = float(100.0 * top.sum(axis=1).mean() / k)
    out["miap"] = float(100.0 * np.nanmean(average_precision(scores, truth)))
    return out
