"""Training losses over L2-normalised image directions and text embeddings (torch)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

Tensor = Any  # torch is loosely typed; tensors are annotated as Any


def info_nce(images: Tensor, texts: Tensor, logit_scale: Tensor) -> Tensor:
    """Symmetric InfoNCE (CLIP): cross-entropy over the batch both ways; row i of each side is a pair."""
    logits = logit_scale * images @ texts.T
    target = torch.arange(images.shape[0], device=images.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


def triplet_hardest(images: Tensor, texts: Tensor, margin: float, hardest: bool = True) -> Tensor:
    """Bidirectional hinge ranking loss (VSE++, Faghri et al. 2018), mean over the batch.

    With `hardest` each positive pair is charged only for its hardest in-batch negative in each
    direction (max of violations); without, for the sum over all negatives (VSE0).
    """
    scores = images @ texts.T
    positive = scores.diag()
    # cost_text[i, j]: caption j outranks image i's caption; cost_image[i, j]: image i outranks caption j's image.
    cost_text = (margin + scores - positive[:, None]).clamp(min=0)
    cost_image = (margin + scores - positive[None, :]).clamp(min=0)
    eye = torch.eye(scores.shape[0], dtype=torch.bool, device=scores.device)
    cost_text = cost_text.masked_fill(eye, 0)
    cost_image = cost_image.masked_fill(eye, 0)
    if hardest:
        return (cost_text.max(dim=1).values + cost_image.max(dim=0).values).mean()
    return (cost_text.sum(dim=1) + cost_image.sum(dim=0)).mean()


def cosine_regression(images: Tensor, texts: Tensor) -> Tensor:
    """DeViSE-style regression: mean of 1 - cos(image direction, its caption embedding)."""
    return (1 - F.cosine_similarity(images, texts, dim=-1)).mean()


def pairwise_tag_ranking(images: Tensor, tags: Tensor, positive: Tensor, scale: float) -> Tensor:
    """Fast0Tag's pairwise logistic ranking loss (Zhang et al. 2016).

    For image i with positive tags P_i and negatives N_i the loss is the mean over pairs (p, n) of
    log(1 + exp(scale * (<x_i, t_n> - <x_i, t_p>))), averaged over the images that have both kinds.
    `positive` is a boolean [B, T] mask; `tags` holds the T tag embeddings.
    """
    scores = scale * images @ tags.T  # [B, T]
    pos = positive.to(torch.bool)
    neg = ~pos
    k = int(pos.sum(dim=1).max())
    if k == 0:
        return scores.sum() * 0
    # Gather each image's positives (padded to the largest count) so the pair tensor is [B, k, T], not [B, T, T].
    order = torch.argsort(pos.to(torch.int8), dim=1, descending=True, stable=True)[:, :k]
    pos_valid = torch.gather(pos, 1, order)
    pos_scores = torch.gather(scores, 1, order)
    # diff[i, p, n] = s_n - s_p for every (p, n); masked to real positives p and negatives n.
    diff = scores[:, None, :] - pos_scores[:, :, None]
    pair_mask = pos_valid[:, :, None] & neg[:, None, :]
    per_pair = F.softplus(diff) * pair_mask
    counts = pair_mask.sum(dim=(1, 2))
    valid = counts > 0
    if not bool(valid.any()):
        return scores.sum() * 0
    per_image = per_pair.sum(dim=(1, 2))[valid] / counts[valid]
    return per_image.mean()
