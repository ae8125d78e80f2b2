"""Hubness-corrected text -> image ranking on small matrices whose answers are worked out by hand."""

from __future__ import annotations

import numpy as np

from imgsearch.training.metrics import target_ranks
from imgsearch.training.retrieval_hubness import Setting, corrected_scores, image_hubness


def test_an_image_close_to_many_captions_is_pushed_down() -> None:
    # Two queries x two images; image 0 is a hub (hubness 0.4), image 1 is not.
    scores = np.array([[0.9, 0.8], [0.5, 0.6]], dtype=np.float32)
    corrected = corrected_scores(scores, np.array([0.4, 0.0], dtype=np.float32), 0.5)
    np.testing.assert_allclose(corrected, [[0.7, 0.8], [0.3, 0.6]], atol=1e-6)
    # Query 0's true image is 1: rank 2 before, rank 1 after; query 1's stays at rank 1.
    target = np.array([1, 1])
    assert target_ranks(scores, target).tolist() == [2, 1]
    assert target_ranks(corrected, target).tolist() == [1, 1]
    # Weight 0 is the plain ranking.
    np.testing.assert_array_equal(corrected_scores(scores, np.array([0.4, 0.0], dtype=np.float32), 0.0), scores)


def test_csls_hubness_is_the_mean_cosine_to_the_nearest_captions() -> None:
    images = np.array([[1.0, 0.0], [0.0, 1.0]], dtype=np.float32)
    bank = np.array([[1.0, 0.0], [0.6, 0.8], [0.0, -1.0]], dtype=np.float32)
    # Cosines: image 0 -> (1, 0.6, 0), image 1 -> (0, 0.8, -1).
    one = image_hubness(images, bank, Setting("csls", 1, 0.05, 1.0))
    two = image_hubness(images, bank, Setting("csls", 2, 0.05, 1.0))
    np.testing.assert_allclose(one, [1.0, 0.8], atol=1e-6)
    np.testing.assert_allclose(two, [0.8, 0.4], atol=1e-6)


def test_inverted_softmax_hubness_is_the_banks_log_normaliser() -> None:
    images = np.array([[1.0, 0.0]], dtype=np.float32)
    bank = np.array([[1.0, 0.0], [0.0, 1.0]], dtype=np.float32)
    t = 0.5
    expected = t * np.log((np.exp(1.0 / t) + np.exp(0.0)) / 2)
    hubness = image_hubness(images, bank, Setting("inverted_softmax", 10, t, 1.0))
    np.testing.assert_allclose(hubness, [expected], atol=1e-5)
