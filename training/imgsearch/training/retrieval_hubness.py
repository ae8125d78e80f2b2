"""Hubness correction of text -> image search, measured: images penalised by their closeness to a caption bank.

Some images sit close to many caption directions and come up for every query ("hubs"). As in CSLS (Lample et
al. 2018) an image x gets a hubness r_x from a fixed bank of training captions (projected by the head): the mean
cosine to its k nearest bank rows, or the log-normaliser of an inverted softmax over the whole bank (Smith et al.
2017). A query q then ranks images by cos(q, x) - weight * r_x. r_x depends only on the image and the bank, so
it could be computed once when an image is added; nothing here is served yet.

Settings are chosen on the dev split by the same selection score as the heads (mean text -> image R@1/5/10/20);
test is reported for the plain ranking and for the chosen setting only.

    python -m imgsearch.training.retrieval_hubness --data ../shared/data/flickr8k
"""

from __future__ import annotations

import argparse
import itertools
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from imgsearch.heads import Head, load_head
from imgsearch.heads.model import TagHubness
from imgsearch.models.manifest import ModelManifest
from imgsearch.training.data import Prepared, SplitData, prepare
from imgsearch.training.evaluate import selection_score
from imgsearch.training.features import Matrix
from imgsearch.training.metrics import recall_at, target_ranks

KS = (5, 10, 20, 50)
WEIGHTS = (0.25, 0.5, 0.75, 1.0)
TEMPERATURES = (0.03, 0.05, 0.1)


@dataclass(frozen=True)
class Setting:
    """One hubness correction: kind (csls or inverted_softmax), its k or temperature, and its weight."""

    kind: str
    k: int
    temperature: float
    weight: float

    def label(self) -> str:
        what = f"k={self.k}" if self.kind == "csls" else f"T={self.temperature}"
        return f"{self.kind} {what}, weight {self.weight}"


def settings() -> list[Setting]:
    csls = [Setting("csls", k, 0.05, w) for k, w in itertools.product(KS, WEIGHTS)]
    soft = [Setting("inverted_softmax", 10, t, w) for t, w in itertools.product(TEMPERATURES, WEIGHTS)]
    return csls + soft


def corrected_scores(scores: Matrix, hubness: Matrix, weight: float) -> Matrix:
    """Query x image scores minus each image's weighted hubness (the ranking of every query changes alike)."""
    return (scores - weight * hubness[None, :]).astype(np.float32)


def recalls(scores: Matrix, split: SplitData) -> dict[str, float]:
    ranks = target_ranks(scores, split.text_image)
    return {f"t2i_r{k}": recall_at(ranks, k) for k in (1, 5, 10, 20)}


def image_hubness(images: Matrix, bank: Matrix, setting: Setting) -> Matrix:
    """r_x of each projected image against the caption bank (the tag ranking's hubness, with roles swapped)."""
    return TagHubness(bank, setting.k, 1.0, setting.kind, setting.temperature).hubness(images)


def projected(head: Head, split: SplitData) -> tuple[Matrix, Matrix]:
    feats, logits = split.features.averaged(("orig",))
    images = head.project_images(feats, logits if head.needs_logits else None)
    return images, head.project_texts(split.text_embeddings)


def caption_bank(head: Head, data: Prepared, size: int, seed: int) -> Matrix:
    """The projected training captions, or a seeded sample of `size` of them."""
    bank = head.project_texts(data.splits["train"].text_embeddings)
    if 0 < size < len(bank):
        rows = np.random.default_rng(seed).choice(len(bank), size=size, replace=False)
        bank = bank[np.sort(rows)]
    return bank


def study(head: Head, data: Prepared, bank_sizes: list[int], seed: int) -> list[str]:
    """Markdown lines: plain and dev-chosen corrected recall on dev and test, per bank size."""
    splits = {name: projected(head, data.splits[name]) for name in ("dev", "test")}
    scores = {name: (t @ i.T).astype(np.float32) for name, (i, t) in splits.items()}
    plain = {name: recalls(scores[name], data.splits[name]) for name in splits}
    lines = [
        "| ranking | bank (training captions) | dev R@1 / R@5 / R@10 | test R@1 / R@5 / R@10 |",
        "|---|---:|---|---|",
    ]

    def cell(m: dict[str, float]) -> str:
        return f"{m['t2i_r1']:.1f} / {m['t2i_r5']:.1f} / {m['t2i_r10']:.1f}"

    lines.append(f"| plain cosine (served) | - | {cell(plain['dev'])} | {cell(plain['test'])} |")
    for size in bank_sizes:
        bank = caption_bank(head, data, size, seed)
        dev_images = splits["dev"][0]
        best: tuple[float, Setting, dict[str, float]] | None = None
        for s in settings():
            corrected = corrected_scores(scores["dev"], image_hubness(dev_images, bank, s), s.weight)
            m = recalls(corrected, data.splits["dev"])
            if best is None or selection_score(m) > best[0]:
                best = (selection_score(m), s, m)
        assert best is not None
        _, chosen, dev = best
        corrected = corrected_scores(scores["test"], image_hubness(splits["test"][0], bank, chosen), chosen.weight)
        test = recalls(corrected, data.splits["test"])
        lines.append(f"| {chosen.label()} (chosen on dev) | {len(bank):,} | {cell(dev)} | {cell(test)} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="Flickr8k directory")
    parser.add_argument("--model-dir", type=Path, default=Path("models"))
    parser.add_argument("--head", type=Path, default=Path("heads/default.npz"))
    parser.add_argument(
        "--bank-sizes", type=int, nargs="+", default=[0, 5000, 1000], help="caption bank sizes (0 = every caption)"
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    data = prepare(args.data, args.model_dir, progress=False)
    manifest = ModelManifest.load(args.model_dir)
    head = load_head(
        args.head,
        image_model=data.image_model,
        feature_dim=manifest.feature_dim,
        text_dim=manifest.text_dim,
        conse=data.conse(),
    )
    lines = study(head, data, args.bank_sizes, args.seed)
    lines.append("")
    cmd = ["python", "-m", "imgsearch.training.retrieval_hubness", *(sys.argv[1:] if argv is None else argv)]
    lines.append(f"head {args.head.name}; command: {shlex.join(cmd)}")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
