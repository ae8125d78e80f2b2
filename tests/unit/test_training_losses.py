"""Training losses against values computed by hand or with an independent numpy formula."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from imgsearch.training.losses import cosine_regression, info_nce, pairwise_tag_ranking, triplet_hardest


def test_info_nce_matches_numpy_cross_entropy() -> None:
    img = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    txt = torch.tensor([[0.8, 0.6], [0.0, 1.0], [1.0, 0.0]])
    scale = torch.tensor(2.0)
    logits = 2.0 * img.numpy() @ txt.numpy().T

    def ce(m: np.ndarray) -> float:
        m = m - m.max(axis=1, keepdims=True)
        logp = m - np.log(np.exp(m).sum(axis=1, keepdims=True))
        return float(-np.mean(np.diag(logp)))

    expected = (ce(logits) + ce(logits.T)) / 2
    assert float(info_nce(img, txt, scale)) == pytest.approx(expected, rel=1e-6)


def test_info_nce_two_pairs_by_hand() -> None:
    # Scores [[1, 0], [0, 1]] at scale 1: every row and column has loss log(1 + e^-1).
    eye = torch.eye(2)
    assert float(info_nce(eye, eye, torch.tensor(1.0))) == pytest.approx(math.log(1 + math.exp(-1)), rel=1e-6)


def test_triplet_hardest_by_hand() -> None:
    # Scores S = img @ txt.T = [[0.9, 0.8, 0.1], [0.5, 0.7, 0.6], [0.2, 0.75, 0.3]] (built directly below).
    s = np.array([[0.9, 0.8, 0.1], [0.5, 0.7, 0.6], [0.2, 0.75, 0.3]], dtype=np.float32)
    img = torch.eye(3)
    txt = torch.from_numpy(s.T.copy())  # img @ txt.T == s
    margin = 0.2
    # Hardest caption for image i: max_j!=i (m + s_ij - s_ii)+ -> i0: 0.1, i1: 0.1, i2: 0.65.
    # Hardest image for caption j: max_i!=j (m + s_ij - s_jj)+ -> j0: 0, j1: 0.3, j2: 0.5.
    expected = ((0.1 + 0.0) + (0.1 + 0.3) + (0.65 + 0.5)) / 3
    assert float(triplet_hardest(img, txt, margin)) == pytest.approx(expected, abs=1e-6)
    # Sum over all negatives (VSE0): captions i0: 0.1+0, i1: 0+0.1, i2: 0.1+0.65; images j0: 0+0,
    # j1: 0.3+0.25, j2: 0+0.5.
    expected_sum = (0.1 + 0.1 + 0.75 + 0.0 + 0.55 + 0.5) / 3
    assert float(triplet_hardest(img, txt, margin, hardest=False)) == pytest.approx(expected_sum, abs=1e-6)


def test_cosine_regression_by_hand() -> None:
    img = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    txt = torch.tensor([[1.0, 1.0], [0.0, -1.0]])
    # cos = 1/sqrt(2) and -1 -> mean(1 - cos) = (1 - 0.70711 + 2) / 2.
    assert float(cosine_regression(img, txt)) == pytest.approx((1 - 1 / math.sqrt(2) + 2) / 2, rel=1e-6)


def test_pairwise_tag_ranking_by_hand() -> None:
    img = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    tags = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    # Image 0 scores tags (1, 0, 0.6); positives {0}, negatives {1, 2}.
    # Image 1 scores tags (0, 1, 0.8); positives {1, 2}, negatives {0}.
    positive = torch.tensor([[True, False, False], [False, True, True]])
    scale = 2.0

    def sp(x: float) -> float:
        return math.log1p(math.exp(x))

    img0 = (sp(scale * (0 - 1)) + sp(scale * (0.6 - 1))) / 2
    img1 = (sp(scale * (0 - 1)) + sp(scale * (0 - 0.8))) / 2
    got = float(pairwise_tag_ranking(img, tags, positive, scale))
    assert got == pytest.approx((img0 + img1) / 2, rel=1e-6)


def test_pairwise_tag_ranking_skips_images_without_pairs() -> None:
    img = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    tags = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    # Image 1 has every tag positive, so no pair: only image 0 counts.
    positive = torch.tensor([[True, False], [True, True]])
    expected = math.log1p(math.exp(1.0 * (0 - 1)))
    assert float(pairwise_tag_ranking(img, tags, positive, 1.0)) == pytest.approx(expected, rel=1e-6)


def test_losses_prefer_aligned_pairs() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.nn.functional.normalize(torch.randn(8, 16, generator=gen), dim=1)
    shuffled = x[torch.randperm(8, generator=gen)]
    assert float(info_nce(x, x, torch.tensor(10.0))) < float(info_nce(x, shuffled, torch.tensor(10.0)))
    assert float(triplet_hardest(x, x, 0.2)) < float(triplet_hardest(x, shuffled, 0.2))
    assert float(cosine_regression(x, x)) == pytest.approx(0.0, abs=1e-6)


def test_subsample_positives_keeps_at_most_k_of_the_positives() -> None:
    from imgsearch.training.train import subsample_positives

    gen = torch.Generator().manual_seed(0)
    mask = torch.zeros(3, 20, dtype=torch.bool)
    mask[0, :12] = True  # more than k: cut to k
    mask[1, [3, 7]] = True  # fewer than k: all kept
    out = subsample_positives(mask, 5, gen)
    assert out.sum(dim=1).tolist() == [5, 2, 0]
    assert not bool((out & ~mask).any())
    assert out[1].nonzero().flatten().tolist() == [3, 7]
