"""Trainable heads (torch) and their export to the tagger's .npz head format."""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from imgsearch.heads import save_head
from imgsearch.training.features import Matrix

MLP_HIDDEN = (1024, 512)


@dataclass(frozen=True)
class HeadSpec:
    """Architecture of a head: image side, optional text adapter, input normalisation."""

    kind: str = "linear"  # "linear" or "mlp"
    feature_dim: int = 1280
    text_dim: int = 384
    dropout: float = 0.0
    text_adapter: bool = False
    feature_norm: str = "standard"  # "standard", "l2" or "none"


class HeadModel(nn.Module):  # type: ignore[misc]
    """Image features -> L2-normalised direction in the text space; texts -> optionally adapted, normalised."""

    def __init__(self, spec: HeadSpec, feature_mean: Matrix | None = None, feature_std: Matrix | None = None) -> None:
        super().__init__()
        self.spec = spec
        dims = [spec.feature_dim, *(MLP_HIDDEN if spec.kind == "mlp" else ()), spec.text_dim]
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(itertools.pairwise(dims)):
            if spec.dropout > 0:
                layers.append(nn.Dropout(spec.dropout))
            layers.append(nn.Linear(a, b))
            if i < len(dims) - 2:
                layers.append(nn.ReLU())
        self.image = nn.Sequential(*layers)
        # A zero-initialised residual adapter starts as the identity, i.e. as plain MiniLM.
        self.text = nn.Linear(spec.text_dim, spec.text_dim) if spec.text_adapter else None
        if self.text is not None:
            nn.init.zeros_(self.text.weight)
            nn.init.zeros_(self.text.bias)
        mean = torch.zeros(spec.feature_dim) if feature_mean is None else torch.from_numpy(feature_mean)
        std = torch.ones(spec.feature_dim) if feature_std is None else torch.from_numpy(feature_std)
        self.register_buffer("feature_mean", mean.float())
        self.register_buffer("feature_std", std.float())
        self.logit_scale = nn.Parameter(torch.tensor(float(np.log(1 / 0.07))))

    def normalise_features(self, x: Any) -> Any:
        if self.spec.feature_norm == "l2":
            return F.normalize(x, dim=-1)
        if self.spec.feature_norm == "standard":
            return (x - self.feature_mean) / self.feature_std
        return x

    def images(self, x: Any) -> Any:
        return F.normalize(self.image(self.normalise_features(x)), dim=-1)

    def texts(self, t: Any) -> Any:
        if self.text is None:
            return F.normalize(t, dim=-1)
        return F.normalize(t + self.text(t), dim=-1)

    def scale(self) -> Any:
        # CLIP clamps the learned temperature so logits cannot blow up.
        return self.logit_scale.exp().clamp(max=100.0)


def head_arrays(model: HeadModel, half: bool) -> tuple[dict[str, Matrix], list[dict[str, str]], list[dict[str, str]]]:
    """The model's weights as arrays (weights transposed to x @ W) plus the manifest layer specs."""
    arrays: dict[str, Any] = {}
    image_layers: list[dict[str, str]] = []
    linears = [m for m in model.image if isinstance(m, nn.Linear)]
    for i, lin in enumerate(linears):
        w = lin.weight.detach().cpu().numpy().T
        arrays[f"image_w{i}"] = w.astype(np.float16 if half else np.float32)
        arrays[f"image_b{i}"] = lin.bias.detach().cpu().numpy().astype(np.float32)
        act = "relu" if i < len(linears) - 1 else "none"
        image_layers.append({"weight": f"image_w{i}", "bias": f"image_b{i}", "activation": act})
    text_layers: list[dict[str, str]] = []
    text: Any = model.text
    if text is not None:
        arrays["text_w0"] = text.weight.detach().cpu().numpy().T.astype(np.float32)
        arrays["text_b0"] = text.bias.detach().cpu().numpy().astype(np.float32)
        text_layers.append({"weight": "text_w0", "bias": "text_b0", "activation": "none"})
    if model.spec.feature_norm == "standard":
        buffers: dict[str, Any] = dict(model.named_buffers())
        arrays["feature_mean"] = buffers["feature_mean"].cpu().numpy().astype(np.float32)
        arrays["feature_std"] = buffers["feature_std"].cpu().numpy().astype(np.float32)
    return arrays, image_layers, text_layers


def export_head(
    path: Path,
    model: HeadModel,
    manifest: dict[str, Any],
    half: bool | None = None,
    extra: dict[str, Any] | None = None,
) -> None:
    """Write the head in the tagger's format; MLP weights go to float16 so the file stays under 5 MB.

    `extra` arrays (e.g. the tag gate's caption bank) are stored next to the weights.
    """
    half = model.spec.kind == "mlp" if half is None else half
    arrays, image_layers, text_layers = head_arrays(model, half)
    arrays.update(extra or {})
    full = {
        **manifest,
        "kind": model.spec.kind,
        "feature_dim": model.spec.feature_dim,
        "text_dim": model.spec.text_dim,
        "feature_norm": model.spec.feature_norm,
        "image_layers": image_layers,
        "text_layers": text_layers,
        "text_residual": bool(text_layers),
        "weights_dtype": "float16" if half else "float32",
    }
    save_head(path, full, arrays)
