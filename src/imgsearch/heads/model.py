"""Projection heads: map an image into the text-embedding space (its principal direction), in process."""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from imgsearch.kit.errors import FailedPrecondition, InvalidArgument

log = logging.getLogger(__name__)

Matrix = npt.NDArray[np.float32]
HEAD_FORMAT = "imgsearch-head/1"
CONSE_DESCRIPTION = "training-free; objects of ImageNet-like classes"


def l2_normalise(x: Matrix) -> Matrix:
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    return (x / np.maximum(norms, 1e-12)).astype(np.float32, copy=False)


def softmax(logits: Matrix) -> Matrix:
    z = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(axis=-1, keepdims=True)).astype(np.float32, copy=False)


class Head(Protocol):
    """What the tagger needs from a head; every output row is L2-normalised, except `tag_direction`'s, whose
    length may set how much the tag bias counts for that image (a tag's score is direction . tag + bias)."""

    name: str
    version: str
    kind: str
    image_model: str
    metrics: dict[str, float]

    @property
    def needs_logits(self) -> bool: ...

    def project_images(self, features: Matrix, logits: Matrix | None) -> Matrix: ...

    def project_texts(self, embeddings: Matrix) -> Matrix: ...

    def search_queries(self, vectors: Matrix) -> Matrix:
        """Search queries in the space of `project_images` (projected texts, or stored image vectors)."""
        ...

    def tag_direction(self, features: Matrix, logits: Matrix | None) -> Matrix: ...

    def tag_bias(self, projected_tags: Matrix) -> Matrix: ...


@dataclass
class ConSEHead:
    """Convex combination of the top-T ImageNet class-name embeddings, weighted by class probability.

    Norouzi et al., "Zero-Shot Learning by Convex Combination of Semantic Embeddings" (ICLR 2014). Needs
    no training. Because the principal direction is built from the class-name embeddings themselves, a
    tag that *is* a class name scores close to 1 against its own class and crowds out synonyms and
    unseen tags; `anchor_penalty` subtracts that share of each tag's best match to any class anchor
    (a per-tag constant, a hubness correction in the spirit of CSLS), which ranks "cat", "kitten" and an
    unseen "feline" above the fine-grained breed names for a cat photo (measured: docs/tagging.md).
    """

    class_embeddings: Matrix
    top_t: int = 10
    anchor_penalty: float = 0.5
    image_model: str = ""
    name: str = "conse"
    version: str = "1"
    kind: str = "conse"
    metrics: dict[str, float] = field(default_factory=dict)
    # What it is for, as a head file's manifest says it (`imgsearch heads list`, the evaluation tables).
    manifest: dict[str, Any] = field(default_factory=lambda: {"description": CONSE_DESCRIPTION})

    @property
    def needs_logits(self) -> bool:
        return True

    def project_images(self, features: Matrix, logits: Matrix | None) -> Matrix:
        if logits is None:
            raise InvalidArgument("the ConSE head needs ImageNet logits for every image")
        probs = softmax(logits.astype(np.float32, copy=False))
        t = min(self.top_t, probs.shape[1])
        top = np.argpartition(-probs, t - 1, axis=1)[:, :t]
        weights = np.take_along_axis(probs, top, axis=1)
        weights = weights / np.maximum(weights.sum(axis=1, keepdims=True), 1e-12)
        combo = np.einsum("nt,ntd->nd", weights, self.class_embeddings[top])
        return l2_normalise(combo.astype(np.float32, copy=False))

    def project_texts(self, embeddings: Matrix) -> Matrix:
        return l2_normalise(embeddings)

    def search_queries(self, vectors: Matrix) -> Matrix:
        return l2_normalise(vectors)

    def tag_direction(self, features: Matrix, logits: Matrix | None) -> Matrix:
        return self.project_images(features, logits)

    def tag_bias(self, projected_tags: Matrix) -> Matrix:
        if self.anchor_penalty == 0.0 or projected_tags.shape[0] == 0:
            return np.zeros(projected_tags.shape[0], dtype=np.float32)
        best = (projected_tags @ self.class_embeddings.T).max(axis=1)
        return (-self.anchor_penalty * best).astype(np.float32)


@dataclass(frozen=True)
class Layer:
    """y = act(x @ weight + bias)."""

    weight: Matrix
    bias: Matrix
    activation: str

    def __call__(self, x: Matrix) -> Matrix:
        y = x @ self.weight + self.bias
        if self.activation == "relu":
            return np.maximum(y, 0.0).astype(np.float32, copy=False)
        return y.astype(np.float32, copy=False)


def _run(layers: list[Layer], x: Matrix) -> Matrix:
    for layer in layers:
        x = layer(x)
    return x


GATE_SIGNALS = ("knn", "conse_confidence", "linear")


@dataclass(frozen=True)
class TagGate:
    """Per-image ConSE weight for tag ranking, from a per-image score that says which expert to trust.

    A learned head is trustworthy on photos like its training data and unreliable far from it, where
    ConSE's ImageNet knowledge is the better expert. Two scores are supported (`signal`):

    - "knn": how in-domain the image looks to the learned head, the mean cosine of the learned image
      direction to its k nearest training captions in `bank` (a kNN density estimate in the shared space);
    - "conse_confidence": how sure the ImageNet classifier is, its largest class probability (softmax of
      the logits). Object photos of ImageNet-like classes score high, scenes with people low; this needs
      no fitting and no bank.
    - "linear": a linear classifier of the kind of photo on the L2-normalised image features, the logit
      features @ bank[0] + offset (bank: one unnormalised row of feature_dim weights). Trained to score
      object photos high and photos like the learned head's training data low.

    The weight ramps linearly from weight_out (score <= low) to weight_in (score >= high). For "knn" the
    high end is in domain (a small ConSE weight); for "conse_confidence" it is a confident object photo (a
    large ConSE weight).
    """

    bank: Matrix
    k: int
    low: float
    high: float
    weight_out: float
    weight_in: float
    signal: str = "knn"
    offset: float = 0.0

    def scores(self, learned: Matrix, logits: Matrix | None = None, features: Matrix | None = None) -> Matrix:
        if self.signal == "linear":
            if features is None:
                raise InvalidArgument("this head's tag gate needs the image features")
            return (l2_normalise(features.astype(np.float32, copy=False)) @ self.bank[0] + self.offset).astype(
                np.float32
            )
        if self.signal == "conse_confidence":
            if logits is None:
                raise InvalidArgument("this head's tag gate needs ImageNet logits for every image")
            return softmax(logits.astype(np.float32, copy=False)).max(axis=1)
        sims = learned @ self.bank.T
        k = min(self.k, sims.shape[1])
        return np.partition(sims, sims.shape[1] - k, axis=1)[:, -k:].mean(axis=1)

    def weights(self, learned: Matrix, logits: Matrix | None = None, features: Matrix | None = None) -> Matrix:
        t = np.clip((self.scores(learned, logits, features) - self.low) / max(self.high - self.low, 1e-6), 0.0, 1.0)
        return (self.weight_out + t * (self.weight_in - self.weight_out)).astype(np.float32)


@dataclass(frozen=True)
class TagMix:
    """Tag ranking with ConSE as the object-photo expert, in the learned head's text space, unnormalised.

    With w the image's ConSE weight (from the tag gates), c ConSE's direction with class probabilities
    softmax(logits / temperature), A the text adapter (x -> normalise(x M + b)) and l the learned direction:

        direction = w * (adapted * A(c) + raw * c M^-T) + (1 - w) * learned_scale * l

    The raw term is ConSE's own score seen through the adapter: c M^-T . A(t) = (c . t + b M^-1 . c) / |t M + b|,
    so up to the per-tag factor |t M + b| it ranks tags as ConSE does in MiniLM's space, where the class names
    live; the adapted term alone loses object tags the adapter moved. A softer class distribution
    (temperature > 1) lets more of the likely classes vote. The direction is not normalised: its length against
    the tag bias is what differs between object photos and the rest (the bias is one vector for every image),
    and `raw_anchor_penalty` (the tag bias' share of the tag's best cosine to a class name in MiniLM's space,
    ConSE's own anchor penalty) acts through it.
    """

    temperature: float = 1.0
    adapted: float = 1.0
    raw: float = 0.0
    learned_scale: float = 1.0
    raw_anchor_penalty: float = 0.0

    def manifest(self) -> dict[str, float]:
        return dataclasses.asdict(self)


HUB_KINDS = ("csls", "inverted_softmax")


def bank_hubness(vectors: Matrix, bank: Matrix, kind: str, k: int, temperature: float) -> Matrix:
    """Hubness r of each unit row against a fixed bank: the mean cosine to its k nearest bank rows ("csls"), or
    temperature * log(mean_j exp(cos_j / temperature)) ("inverted_softmax")."""
    if vectors.shape[0] == 0:
        return np.zeros(0, dtype=np.float32)
    sims = (vectors @ bank.T).astype(np.float64)
    if kind == "inverted_softmax":
        z = sims / temperature
        top = z.max(axis=1, keepdims=True)
        lse = top[:, 0] + np.log(np.exp(z - top).mean(axis=1))
        return (temperature * lse).astype(np.float32)
    k = min(k, sims.shape[1])
    return np.partition(sims, sims.shape[1] - k, axis=1)[:, -k:].mean(axis=1).astype(np.float32)


@dataclass(frozen=True)
class TagHubness:
    """Hubness correction of tag scores: a per-tag penalty from the tag's similarity to a fixed image bank.

    Some tags sit close to many image directions ("hubs", Radovanovic et al., JMLR 2010) and crowd the top
    of every ranking. With `bank` a fixed sample of image tag directions stored in the head file, a tag's
    hubness r_t is either (kind "csls") the mean cosine to its k nearest bank rows, as in CSLS (Lample et
    al. 2018: score = 2 cos - r_t - r_x, where r_x is constant per image), or (kind "inverted_softmax")
    temperature * log(mean_j exp(cos_j / temperature)), the log-normaliser of the inverted softmax (Smith
    et al. 2017). The tag's score becomes cos - weight * r_t. r_t depends only on the tag and the bank, so a
    tag added at run time is corrected at once, and every other tag's correction stays the same.
    """

    bank: Matrix
    k: int
    weight: float
    kind: str = "csls"
    temperature: float = 0.05

    def hubness(self, projected_tags: Matrix) -> Matrix:
        """r_t of each (projected, unit) tag."""
        return bank_hubness(projected_tags, self.bank, self.kind, self.k, self.temperature)

    def penalty(self, projected_tags: Matrix) -> Matrix:
        return (self.weight * self.hubness(projected_tags)).astype(np.float32)


@dataclass(frozen=True)
class SearchHubness:
    """Hubness correction of text -> image search, folded into the stored semantic vectors themselves.

    The roles of TagHubness swapped: an image x gets a hubness r_x against a fixed bank of training captions,
    and queries should rank images by cos(q, x) - d_x, with d_x = weight * (r_x - centre) (centre: the mean
    r_x of the training images, so scores keep their level). d_x depends only on the image, so it is computed
    once, when the image is projected, and it travels in the vector: every text the head projects is
    orthogonal to `axis` (a direction the text model never uses: MiniLM's embeddings span fewer than 384
    dimensions), so the image keeps only d_x there, as -d_x / scale, and a query gets the constant `scale`
    there. Then q' . x' = (cos(q, x) - d_x) / (|q'| |x'|): HNSW, Flat, filters, paging and min_score all rank
    by the corrected score with no change to the index or its contract. |q'| is the same for every image of a
    query; |x'| differs from 1 by about (d_x / scale)^2 / 2: 0.002 for a typical image of the shipped default
    (d_x about 0.03 at scale 0.5), 0.02 for its strongest hubs.
    """

    bank: Matrix
    weight: float
    centre: float
    axis: Matrix
    scale: float
    kind: str = "inverted_softmax"
    k: int = 10
    temperature: float = 0.05

    def offsets(self, images: Matrix) -> Matrix:
        """d_x of each unit image vector (unfolded)."""
        r = bank_hubness(images, self.bank, self.kind, self.k, self.temperature)
        return (self.weight * (r - self.centre)).astype(np.float32)

    def fold_images(self, images: Matrix) -> Matrix:
        """Unit image vectors that carry -d_x / scale along the axis instead of their own (unused) component."""
        if images.shape[0] == 0:
            return images
        along = images @ self.axis
        shift = along + self.offsets(images) / self.scale
        return l2_normalise((images - shift[:, None] * self.axis[None, :]).astype(np.float32))

    def fold_queries(self, vectors: Matrix) -> Matrix:
        """Unit queries: the vector without its axis component (an image's offset, if it is one), plus scale
        along the axis, so each image's offset counts once, with weight 1."""
        if vectors.shape[0] == 0:
            return vectors
        flat = l2_normalise(vectors - (vectors @ self.axis)[:, None] * self.axis[None, :])
        return l2_normalise((flat + self.scale * self.axis[None, :]).astype(np.float32))

    def manifest(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "k": self.k,
            "temperature": self.temperature,
            "weight": self.weight,
            "centre": self.centre,
            "scale": self.scale,
        }


@dataclass
class LearnedHead:
    """A trained head stored as an .npz file: image MLP/linear layers and an optional text adapter."""

    name: str
    version: str
    kind: str
    image_model: str
    image_layers: list[Layer]
    text_layers: list[Layer]
    # "l2" normalises the 1280-d features before the first layer; "standard" uses mean/std arrays.
    feature_norm: str
    feature_mean: Matrix | None
    feature_std: Matrix | None
    # Adds the adapter output to its input (a residual adapter stays close to MiniLM's space).
    text_residual: bool
    # Blend weight of the ConSE direction in the final image direction (0 = learned head alone).
    conse_weight: float
    conse: ConSEHead | None
    manifest: dict[str, Any]
    metrics: dict[str, float] = field(default_factory=dict)
    # Tag ranking may blend ConSE differently from search: retrieval and tagging are evaluated apart
    # (docs/evaluation.md), and each weight is chosen on its own task. None means conse_weight.
    tag_conse_weight: float | None = None
    # Share of each tag's best match to an ImageNet class name subtracted from its score (see ConSEHead).
    tag_anchor_penalty: float = 0.0
    # Optional in-domain gate for the tag blend (see TagGate): replaces tag_conse_weight per image.
    tag_gate: TagGate | None = None
    # Optional hubness correction of tag scores (see TagHubness), added to the anchor penalty.
    tag_hub: TagHubness | None = None
    # Optional second gate: the image's tag ConSE weight is the larger of the two gates' weights (e.g. a
    # photo-kind gate and an in-domain gate, so either an object photo or an unfamiliar photo gets ConSE).
    tag_gate_max: TagGate | None = None
    # Optional unnormalised ConSE/learned tag mixture (see TagMix); None: the normalised blend of `_blend`.
    tag_mix: TagMix | None = None
    # Optional hubness correction of search (see SearchHubness): folded into project_images' vectors.
    search_hub: SearchHubness | None = None
    _anchors: Matrix | None = None
    # The text adapter's inverse linear map and its offset through it (M^-1, b M^-1), for TagMix.
    _inverse: tuple[Matrix, Matrix] | None = None

    @property
    def needs_logits(self) -> bool:
        uses = max(self.conse_weight, self.tag_conse_weight or 0.0) > 0 or self.tag_gate is not None
        return self.conse is not None and (uses or self.tag_gate_max is not None or self.tag_mix is not None)

    def learned_direction(self, features: Matrix) -> Matrix:
        """The learned image direction alone (no ConSE blend)."""
        return l2_normalise(_run(self.image_layers, self._features(features)))

    def _features(self, features: Matrix) -> Matrix:
        x = features.astype(np.float32, copy=False)
        if self.feature_norm == "l2":
            return l2_normalise(x)
        if self.feature_norm == "standard" and self.feature_mean is not None and self.feature_std is not None:
            return ((x - self.feature_mean) / self.feature_std).astype(np.float32, copy=False)
        return x

    def _blend(self, features: Matrix, logits: Matrix | None, weight: float | Matrix) -> Matrix:
        learned = l2_normalise(_run(self.image_layers, self._features(features)))
        if self.conse is None or np.all(np.asarray(weight) <= 0):
            return learned
        conse = self.conse.project_images(features, logits)
        if self.text_layers:
            conse = self.project_texts(conse)
        return l2_normalise(weight * conse + (1.0 - weight) * learned)

    def project_images(self, features: Matrix, logits: Matrix | None) -> Matrix:
        images = self._blend(features, logits, self.conse_weight)
        return images if self.search_hub is None else self.search_hub.fold_images(images)

    def search_queries(self, vectors: Matrix) -> Matrix:
        return l2_normalise(vectors) if self.search_hub is None else self.search_hub.fold_queries(vectors)

    def tag_direction(self, features: Matrix, logits: Matrix | None) -> Matrix:
        if self.tag_gate is not None:
            learned = self.learned_direction(features)
            weights = self.tag_gate.weights(learned, logits, features)
            if self.tag_gate_max is not None:
                weights = np.maximum(weights, self.tag_gate_max.weights(learned, logits, features))
            if self.tag_mix is not None:
                return self._mix(features, logits, weights[:, None])
            return self._blend(features, logits, weights[:, None])
        weight = self.conse_weight if self.tag_conse_weight is None else self.tag_conse_weight
        if self.tag_mix is not None:
            return self._mix(features, logits, np.full((features.shape[0], 1), weight, np.float32))
        return self._blend(features, logits, weight)

    def _mix(self, features: Matrix, logits: Matrix | None, weights: Matrix) -> Matrix:
        """TagMix's direction for per-image ConSE weights (n, 1)."""
        mix = self.tag_mix
        assert mix is not None
        out = ((1.0 - weights) * mix.learned_scale * self.learned_direction(features)).astype(np.float32)
        if self.conse is None or not np.any(weights > 0):
            return out
        if logits is None:
            raise InvalidArgument("this head's tag ranking needs ImageNet logits for every image")
        conse = self.conse.project_images(features, (logits / mix.temperature).astype(np.float32))
        expert = np.zeros_like(out)
        if mix.adapted:
            expert += mix.adapted * self.project_texts(conse)
        if mix.raw:
            expert += mix.raw * (conse @ self.inverse()[0].T)
        return (out + weights * expert).astype(np.float32)

    def inverse(self) -> tuple[Matrix, Matrix]:
        """(M^-1, b M^-1) of the text adapter x -> x M + b (M = W + I when residual); identity without one."""
        if self._inverse is None:
            dim = self.image_layers[-1].weight.shape[1]
            if not self.text_layers:
                self._inverse = (np.eye(dim, dtype=np.float32), np.zeros(dim, np.float32))
            else:
                layer = self.text_layers[0]
                m = layer.weight.astype(np.float64) + (np.eye(dim) if self.text_residual else 0.0)
                inv = np.linalg.inv(m)
                self._inverse = (inv.astype(np.float32), (layer.bias.astype(np.float64) @ inv).astype(np.float32))
        return self._inverse

    def raw_texts(self, projected: Matrix) -> Matrix:
        """The unit MiniLM embeddings whose `project_texts` are `projected`: t = lam a M^-1 - b M^-1 with the
        lam > 0 that makes |t| = 1 (the adapter normalises its output, so its input is recovered up to that).
        That lam is unique when |b M^-1| < 1 (the product of the two roots is then negative); the shipped
        default has 0.30."""
        inv, offset = self.inverse()
        if not self.text_layers:
            return projected
        v = (projected @ inv).astype(np.float64)
        vv, vc, cc = (v * v).sum(axis=1), v @ offset.astype(np.float64), float(offset @ offset)
        lam = (vc + np.sqrt(np.maximum(vc * vc - vv * (cc - 1.0), 0.0))) / np.maximum(vv, 1e-12)
        return l2_normalise((lam[:, None] * v - offset).astype(np.float32))

    def project_texts(self, embeddings: Matrix) -> Matrix:
        if not self.text_layers:
            return l2_normalise(embeddings)
        out = _run(self.text_layers, embeddings.astype(np.float32, copy=False))
        if self.text_residual:
            out = out + embeddings
        return l2_normalise(out)

    def tag_bias(self, projected_tags: Matrix) -> Matrix:
        bias = np.zeros(projected_tags.shape[0], dtype=np.float32)
        if projected_tags.shape[0] == 0:
            return bias
        if self.tag_anchor_penalty != 0.0 and self.conse is not None:
            if self._anchors is None:
                self._anchors = self.project_texts(self.conse.class_embeddings)
            bias -= self.tag_anchor_penalty * (projected_tags @ self._anchors.T).max(axis=1)
        if self.tag_hub is not None:
            bias -= self.tag_hub.penalty(projected_tags)
        if self.tag_mix is not None and self.tag_mix.raw_anchor_penalty != 0.0 and self.conse is not None:
            raw = self.raw_texts(projected_tags)
            bias -= self.tag_mix.raw_anchor_penalty * (raw @ self.conse.class_embeddings.T).max(axis=1)
        return bias.astype(np.float32, copy=False)


def _layers(arrays: dict[str, Matrix], specs: list[dict[str, str]], what: str) -> list[Layer]:
    layers = []
    for i, spec in enumerate(specs):
        try:
            w, b = arrays[spec["weight"]], arrays[spec["bias"]]
        except KeyError as exc:
            raise InvalidArgument(f"head file: {what} layer {i} refers to missing array {exc}") from None
        if w.ndim != 2 or b.shape != (w.shape[1],):
            raise InvalidArgument(f"head file: {what} layer {i} has shapes {w.shape} and {b.shape}")
        if spec.get("activation", "none") not in ("none", "relu"):
            raise InvalidArgument(f"head file: unknown activation {spec.get('activation')!r}")
        layers.append(Layer(w.astype(np.float32), b.astype(np.float32), spec.get("activation", "none")))
    for prev, nxt in itertools.pairwise(layers):
        if prev.weight.shape[1] != nxt.weight.shape[0]:
            raise InvalidArgument(
                f"head file: {what} layers do not chain ({prev.weight.shape} then {nxt.weight.shape})"
            )
    return layers


def _gate(arrays: dict[str, Matrix], spec: Any, text_dim: int, feature_dim: int, name: str) -> TagGate | None:
    if spec is None:
        return None
    try:
        signal = str(spec.get("signal", "knn"))
        if signal == "knn" or "bank" in spec:
            bank = arrays[str(spec["bank"])].astype(np.float32)
        else:
            bank = np.zeros((0, text_dim), dtype=np.float32)
        gate = TagGate(
            # A linear gate's row is a weight vector, not a direction: it is kept as stored.
            bank=bank if signal == "linear" else l2_normalise(bank),
            k=int(spec.get("k", 1)),
            low=float(spec["low"]),
            high=float(spec["high"]),
            weight_out=float(spec["weight_out"]),
            weight_in=float(spec["weight_in"]),
            signal=signal,
            offset=float(spec.get("offset", 0.0)),
        )
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise InvalidArgument(f"{name}: tag_gate is malformed ({exc})") from None
    if signal not in GATE_SIGNALS:
        raise InvalidArgument(f"{name}: unknown tag_gate signal {signal!r} (known: {', '.join(GATE_SIGNALS)})")
    width = feature_dim if signal == "linear" else text_dim
    if bank.ndim != 2 or bank.shape[1] != width or gate.k < 1 or not gate.low < gate.high:
        raise InvalidArgument(f"{name}: tag_gate needs an (n, {width}) bank, k >= 1 and low < high")
    if signal in ("knn", "linear") and bank.shape[0] == 0:
        raise InvalidArgument(f"{name}: a {signal} tag_gate needs a non-empty bank")
    if not (0.0 <= gate.weight_out <= 1.0 and 0.0 <= gate.weight_in <= 1.0):
        raise InvalidArgument(f"{name}: tag_gate weights must be in [0, 1]")
    return gate


def _hub(arrays: dict[str, Matrix], spec: Any, text_dim: int, name: str) -> TagHubness | None:
    if spec is None:
        return None
    try:
        bank = arrays[str(spec["bank"])].astype(np.float32)
        hub = TagHubness(
            bank=l2_normalise(bank),
            k=int(spec.get("k", 10)),
            weight=float(spec["weight"]),
            kind=str(spec.get("kind", "csls")),
            temperature=float(spec.get("temperature", 0.05)),
        )
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise InvalidArgument(f"{name}: tag_hub is malformed ({exc})") from None
    if hub.kind not in HUB_KINDS:
        raise InvalidArgument(f"{name}: unknown tag_hub kind {hub.kind!r} (known: {', '.join(HUB_KINDS)})")
    if bank.ndim != 2 or bank.shape[0] == 0 or bank.shape[1] != text_dim or hub.k < 1:
        raise InvalidArgument(f"{name}: tag_hub needs a non-empty (n, {text_dim}) bank and k >= 1")
    if not (0.0 <= hub.weight <= 2.0 and hub.temperature > 0.0):
        raise InvalidArgument(f"{name}: tag_hub weight must be in [0, 2] and its temperature > 0")
    return hub


def _search_hub(arrays: dict[str, Matrix], spec: Any, text_dim: int, name: str) -> SearchHubness | None:
    if spec is None:
        return None
    try:
        bank = arrays[str(spec["bank"])].astype(np.float32)
        axis = arrays[str(spec["axis"])].astype(np.float32)
        hub = SearchHubness(
            bank=l2_normalise(bank),
            weight=float(spec["weight"]),
            centre=float(spec["centre"]),
            axis=l2_normalise(axis),
            scale=float(spec["scale"]),
            kind=str(spec.get("kind", "inverted_softmax")),
            k=int(spec.get("k", 10)),
            temperature=float(spec.get("temperature", 0.05)),
        )
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise InvalidArgument(f"{name}: search_hub is malformed ({exc})") from None
    if hub.kind not in HUB_KINDS:
        raise InvalidArgument(f"{name}: unknown search_hub kind {hub.kind!r} (known: {', '.join(HUB_KINDS)})")
    if bank.ndim != 2 or bank.shape[0] == 0 or bank.shape[1] != text_dim or axis.shape != (text_dim,):
        raise InvalidArgument(f"{name}: search_hub needs a non-empty (n, {text_dim}) bank and a ({text_dim},) axis")
    if not (0.0 <= hub.weight <= 2.0 and hub.temperature > 0.0 and hub.scale > 0.0 and hub.k >= 1):
        raise InvalidArgument(f"{name}: search_hub weight must be in [0, 2], its temperature, scale and k > 0")
    return hub


def _mix(spec: Any, text_layers: list[Layer], text_dim: int, name: str) -> TagMix | None:
    if spec is None:
        return None
    try:
        mix = TagMix(**{k: float(v) for k, v in dict(spec).items()})
    except (TypeError, ValueError) as exc:
        raise InvalidArgument(f"{name}: tag_mix is malformed ({exc})") from None
    if not (mix.temperature > 0.0 and min(mix.adapted, mix.raw, mix.learned_scale, mix.raw_anchor_penalty) >= 0.0):
        raise InvalidArgument(f"{name}: tag_mix needs a temperature > 0 and weights >= 0")
    linear = len(text_layers) == 1 and text_layers[0].activation == "none"
    square = linear and text_layers[0].weight.shape == (text_dim, text_dim)
    if (mix.raw or mix.raw_anchor_penalty) and text_layers and not square:
        raise InvalidArgument(f"{name}: tag_mix's raw terms need no text adapter or one square linear layer")
    return mix


def read_head_manifest(path: Path) -> dict[str, Any]:
    """The JSON manifest stored in a head file under the key `manifest`."""
    with np.load(path, allow_pickle=False) as data:
        if "manifest" not in data:
            raise InvalidArgument(f"{path.name} is not an imgsearch head file (no manifest)")
        manifest: dict[str, Any] = json.loads(bytes(data["manifest"]).decode("utf-8"))
    return manifest


def load_head(
    path: Path,
    *,
    image_model: str,
    feature_dim: int,
    text_dim: int,
    conse: ConSEHead | None,
) -> LearnedHead:
    """Load and validate a head file; refuses heads trained on another image model or other dimensions."""
    if not path.exists():
        raise InvalidArgument(f"head file {path} does not exist")
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: np.asarray(data[k]) for k in data.files}
    except (OSError, ValueError) as exc:
        raise InvalidArgument(f"cannot read head file {path.name}: {exc}") from None
    if "manifest" not in arrays:
        raise InvalidArgument(f"{path.name} is not an imgsearch head file (no manifest)")
    manifest: dict[str, Any] = json.loads(bytes(arrays.pop("manifest")).decode("utf-8"))
    if manifest.get("format") != HEAD_FORMAT:
        raise InvalidArgument(f"{path.name}: unsupported head format {manifest.get('format')!r}")
    trained_on = str(manifest.get("image_model", ""))
    # The name part identifies architecture + weights; the hash part changes with re-exports.
    if trained_on.split("@")[0] != image_model.split("@")[0]:
        raise FailedPrecondition(
            f"head {manifest.get('name')} was trained on {trained_on!r} but the encoder serves {image_model!r}"
        )
    if trained_on != image_model:
        log.warning("head exported from another export of the same model", extra={"head": trained_on})
    if int(manifest.get("feature_dim", -1)) != feature_dim or int(manifest.get("text_dim", -1)) != text_dim:
        raise FailedPrecondition(
            f"head {manifest.get('name')} expects {manifest.get('feature_dim')}->{manifest.get('text_dim')} "
            f"dimensions, the encoder gives {feature_dim}->{text_dim}"
        )
    image_layers = _layers(arrays, manifest.get("image_layers", []), "image")
    text_layers = _layers(arrays, manifest.get("text_layers", []), "text")
    if not image_layers:
        raise InvalidArgument(f"{path.name}: a head needs at least one image layer")
    if image_layers[0].weight.shape[0] != feature_dim or image_layers[-1].weight.shape[1] != text_dim:
        raise InvalidArgument(f"{path.name}: image layers do not map {feature_dim} to {text_dim}")
    conse_weight = float(manifest.get("conse_weight", 0.0))
    raw_tag_weight = manifest.get("tag_conse_weight")
    tag_weight = None if raw_tag_weight is None else float(raw_tag_weight)
    tag_penalty = float(manifest.get("tag_anchor_penalty", 0.0))
    for key, value in (
        ("conse_weight", conse_weight),
        ("tag_conse_weight", tag_weight),
        ("tag_anchor_penalty", tag_penalty),
    ):
        if value is not None and not 0.0 <= value <= 1.0:
            raise InvalidArgument(f"{path.name}: {key} must be in [0, 1], got {value}")
    gate = _gate(arrays, manifest.get("tag_gate"), text_dim, feature_dim, path.name)
    hub = _hub(arrays, manifest.get("tag_hub"), text_dim, path.name)
    gate_max = _gate(arrays, manifest.get("tag_gate_max"), text_dim, feature_dim, path.name)
    if gate_max is not None and gate is None:
        raise InvalidArgument(f"{path.name}: tag_gate_max needs a tag_gate")
    mix = _mix(manifest.get("tag_mix"), text_layers, text_dim, path.name)
    search_hub = _search_hub(arrays, manifest.get("search_hub"), text_dim, path.name)
    uses_conse = max(conse_weight, tag_weight or 0.0, tag_penalty) > 0 or gate is not None or mix is not None
    if uses_conse and conse is None:
        raise FailedPrecondition(f"{path.name} blends with ConSE but no ConSE head is available")
    metrics = {str(k): float(v) for k, v in manifest.get("metrics", {}).items() if isinstance(v, int | float)}
    return LearnedHead(
        name=str(manifest["name"]),
        version=str(manifest.get("version", "1")),
        kind=str(manifest.get("kind", "linear")),
        image_model=trained_on,
        image_layers=image_layers,
        text_layers=text_layers,
        feature_norm=str(manifest.get("feature_norm", "none")),
        feature_mean=arrays.get("feature_mean"),
        feature_std=arrays.get("feature_std"),
        text_residual=bool(manifest.get("text_residual", False)),
        conse_weight=conse_weight,
        conse=conse if uses_conse else None,
        tag_conse_weight=tag_weight,
        tag_anchor_penalty=tag_penalty,
        tag_gate=gate,
        tag_hub=hub,
        tag_gate_max=gate_max,
        tag_mix=mix,
        search_hub=search_hub,
        manifest=manifest,
        metrics=metrics,
    )


def save_head(path: Path, manifest: dict[str, Any], arrays: dict[str, Matrix]) -> None:
    """Write a head file (used by training); the manifest is stored as UTF-8 JSON bytes."""
    manifest = {"format": HEAD_FORMAT, **manifest}
    blob = np.frombuffer(json.dumps(manifest, sort_keys=True).encode("utf-8"), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    payload: dict[str, npt.NDArray[np.generic]] = {k: np.asarray(v) for k, v in arrays.items()}
    payload["manifest"] = blob
    np.savez(tmp, **payload)  # type: ignore[arg-type]
    tmp.replace(path)
