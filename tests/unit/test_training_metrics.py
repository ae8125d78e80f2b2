"""Retrieval and tag metrics on small score matrices whose answers are worked out by hand."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from imgsearch.training.metrics import (
    average_precision,
    best_of_ranks,
    median_rank,
    recall_at,
    tag_metrics,
    target_ranks,
    triplet_accuracy,
)

# 4 queries x 3 images.
SCORES = np.array(
    [
        [0.9, 0.1, 0.2],  # target 0: rank 1
        [0.5, 0.4, 0.6],  # target 1: rank 3
        [0.3, 0.8, 0.7],  # target 2: rank 2
        [0.1, 0.2, 0.0],  # target 0: rank 2
    ],
    dtype=np.float32,
)
TARGET = np.array([0, 1, 2, 0])


def test_ranks_recall_and_median() -> None:
    ranks = target_ranks(SCORES, TARGET)
    assert ranks.tolist() == [1, 3, 2, 2]
    assert recall_at(ranks, 1) == 25.0
    assert recall_at(ranks, 2) == 75.0
    assert recall_at(ranks, 3) == 100.0
    assert median_rank(ranks) == 2.0


def test_best_of_ranks_uses_the_best_target() -> None:
    # Image 0's captions are columns 0 and 3 (scores 0.9 and 0.1 in row 0 of the transpose).
    scores = SCORES.T.copy()  # 3 images x 4 captions
    ranks = best_of_ranks(scores, [[0, 3], [1], [2]])
    # Row 0 = [0.9, 0.5, 0.3, 0.1]: best own 0.9 -> rank 1. Row 1 = [0.1, 0.4, 0.8, 0.2]: own 0.4 -> rank 2.
    # Row 2 = [0.2, 0.6, 0.7, 0.0]: own 0.7 -> rank 1.
    assert ranks.tolist() == [1, 2, 1]


def test_triplet_accuracy_counts_every_negative() -> None:
    # Correctly ordered (query, negative) pairs: q0 2/2, q1 0/2, q2 1/2, q3 1/2 -> 4 of 8.
    assert triplet_accuracy(SCORES, TARGET) == pytest.approx(50.0)


def test_average_precision_by_hand() -> None:
    scores = np.array([[0.9, 0.8, 0.7, 0.6], [0.1, 0.2, 0.3, 0.4], [0.5, 0.4, 0.3, 0.2]], dtype=np.float32)
    truth = np.array([[True, False, True, False], [True, False, False, False], [False] * 4])
    ap = average_precision(scores, truth)
    # Row 0: hits at ranks 1 and 3 -> (1/1 + 2/3) / 2. Row 1: the only hit is ranked 4th -> 1/4.
    assert ap[0] == pytest.approx((1 + 2 / 3) / 2)
    assert ap[1] == pytest.approx(0.25)
    assert np.isnan(ap[2])


def test_tag_metrics_by_hand() -> None:
    scores = np.array([[0.9, 0.8, 0.7, 0.6], [0.1, 0.2, 0.3, 0.4], [0.5, 0.4, 0.3, 0.2]], dtype=np.float32)
    truth = np.array([[True, False, True, False], [True, False, False, False], [False] * 4])
    m = tag_metrics(scores, truth, ks=(1, 3))
    # The third image has no true tag and is left out.
    assert m["images"] == 2
    assert m["hit@1"] == pytest.approx(50.0)  # image 0 yes, image 1 no
    assert m["hit@3"] == pytest.approx(50.0)  # image 1's tag is 4th
    assert m["p@3"] == pytest.approx(100 * (2 / 3 + 0) / 2)
    assert m["miap"] == pytest.approx(100 * ((1 + 2 / 3) / 2 + 0.25) / 2)


def test_markdown_results_block_is_replaced_in_place(tmp_path: Path) -> None:
    from imgsearch.training.evaluate import BEGIN, END, write_markdown

    doc = tmp_path / "evaluation.md"
    write_markdown(doc, "| a |", "cmd one")
    first = doc.read_text()
    assert first.startswith("# Evaluation") and "| a |" in first and "`cmd one`" in first
    doc.write_text("# Title\n\nProse before.\n\n" + first[first.index(BEGIN) :] + "\nProse after.\n")
    write_markdown(doc, "| b |", "cmd two")
    text = doc.read_text()
    assert "| a |" not in text and "| b |" in text
    assert text.startswith("# Title\n\nProse before.") and text.rstrip().endswith("Prose after.")
    assert text.count(BEGIN) == 1 and text.count(END) == 1
