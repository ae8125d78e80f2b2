"""Hubness correction of text -> image search, measured: images penalised by their closeness to a caption bank.

Some images sit close to many caption directions and come up for every query ("hubs"). As in CSLS (Lample et
al. 2018) an image x gets a hubness r_x from a fixed bank of training captions (projected by the head): the mean
cosine to its k nearest bank rows, or the log-normaliser of an inverted softmax over the whole bank (Smith et al.
2017). A query q then ranks images by cos(q, x) - weight * r_x. r_x depends only on the image and the bank, so
it is computed once, when an image is projected, and served folded into the image's semantic vector
(`SearchHubness` in imgsearch.heads.model).

Settings are chosen on the dev split by the same selection score as the heads (mean text -> image R@1/5/10/20);
test is reported for the plain ranking and for the chosen setting only. With --write, the setting chosen for the
first bank size is folded into a copy of the head (its version + 1), the fold's scale chosen on dev as well, and
the written head's own retrieval (as the gateway and `make eval` rank) is reported beside the exact correction.

    python -m imgsearch.training.retrieval_hubness --data ../shared/data/flickr8k
    python -m imgsearch.training.retrieval_hubness --data ../shared/data/flickr8k --bank-sizes 5000 \
        --write heads/default.npz
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from imgsearch.heads import Head, load_head
from imgsearch.heads.model import LearnedHead, SearchHubness, bank_hubness, save_head
from imgsearch.models.manifest import ModelManifest
from imgsearch.training.data import Prepared, SplitData, prepare
from imgsearch.training.evaluate import retrieval_metrics, selection_score
from imgsearch.training.features import Matrix
from imgsearch.training.metrics import recall_at, target_ranks

KS = (5, 10, 20, 50)
WEIGHTS = (0.25, 0.5, 0.75, 1.0)
TEMPERATURES = (0.03, 0.05, 0.1)
# The fold's query component along the axis: larger keeps |x'| closer to 1, smaller keeps scores' level.
SCALES = (0.25, 0.5, 1.0)
# Largest |projected text . axis| accepted: the fold is exact only for texts with no component on the axis.
AXIS_TOLERANCE = 1e-4
# Appended to a written head's description (replacing an earlier one).
SEARCH_NOTE = ", hubness-corrected by"


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
    return bank_hubness(images, bank, setting.kind, setting.k, setting.temperature)


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


def unfolded(head: LearnedHead) -> LearnedHead:
    """The head without its search hubness correction (the plain ranking the correction starts from)."""
    return dataclasses.replace(head, search_hub=None)


def unused_axis(head: Head, data: Prepared) -> np.ndarray:
    """A unit direction no projected text uses: the least-variance direction of the projected training captions,
    checked on every split's captions and the ImageNet class names (the text model's embeddings span fewer
    dimensions than it has; refused if the texts do use it)."""
    train = head.project_texts(data.splits["train"].text_embeddings).astype(np.float64)
    _, vectors = np.linalg.eigh(np.cov(train.T))
    axis = vectors[:, 0]
    texts = [head.project_texts(data.splits[n].text_embeddings) for n in ("train", "dev", "test")]
    texts.append(head.project_texts(data.class_embeddings))
    worst = max(float(np.abs(t.astype(np.float64) @ axis).max()) for t in texts)
    if worst > AXIS_TOLERANCE:
        raise SystemExit(f"no unused text direction: projected texts reach {worst:.2e} along the best one")
    return axis.astype(np.float32)


def fold(head: LearnedHead, data: Prepared, bank: Matrix, setting: Setting) -> tuple[LearnedHead, dict[str, Any]]:
    """The head with the correction folded in, its scale chosen on dev; and the dev scores per scale."""
    plain = unfolded(head)
    axis = unused_axis(plain, data)
    train_images = projected(plain, data.splits["train"])[0]
    centre = float(image_hubness(train_images, bank, setting).mean())
    best: tuple[float, LearnedHead] | None = None
    tried: dict[str, Any] = {}
    for scale in SCALES:
        hub = SearchHubness(
            bank=bank,
            weight=setting.weight,
            centre=centre,
            axis=axis,
            scale=scale,
            kind=setting.kind,
            k=setting.k,
            temperature=setting.temperature,
        )
        candidate = dataclasses.replace(plain, search_hub=hub)
        score = selection_score(retrieval_metrics(candidate, data.splits["dev"]))
        tried[f"{scale:g}"] = round(score, 3)
        if best is None or score > best[0]:
            best = (score, candidate)
    assert best is not None
    return best[1], tried


def write_folded(head: LearnedHead, source: Path, out: Path, data: Prepared, tried: dict[str, Any]) -> list[str]:
    """Write `head` (with its search_hub) as a copy of the source file, version + 1, retrieval metrics updated."""
    hub = head.search_hub
    assert hub is not None
    with np.load(source, allow_pickle=False) as raw:
        arrays = {k: np.asarray(raw[k]) for k in raw.files if k != "manifest"}
    arrays["search_hub_bank"] = hub.bank.astype(np.float16)
    arrays["search_hub_axis"] = hub.axis.astype(np.float32)
    manifest = dict(head.manifest)
    manifest["version"] = str(int(str(manifest.get("version", "1"))) + 1)
    manifest["search_hub"] = {
        **hub.manifest(),
        "bank": "search_hub_bank",
        "axis": "search_hub_axis",
        "bank_captions": int(hub.bank.shape[0]),
        "scale_dev_score": tried,
    }
    # The description says what the head is for (`imgsearch heads list`); say once that search is corrected.
    description = str(manifest.get("description", "")).split(SEARCH_NOTE)[0]
    captions = f"{hub.bank.shape[0]:,} training captions"
    manifest["description"] = f"{description}{SEARCH_NOTE} {hub.kind.replace('_', ' ')} over {captions}"
    metrics = dict(manifest.get("metrics", {}))
    lines = []
    for split in ("dev", "test"):
        m = retrieval_metrics(head, data.splits[split])
        for key in ("t2i_r1", "t2i_r5", "t2i_r10", "t2i_r20", "t2i_medr"):
            metrics[f"{split}_{key}"] = round(m[key], 2)
        if split == "dev":
            for key in ("i2t_r1", "i2t_r5", "i2t_r10", "triplet_acc"):
                metrics[f"dev_{key}"] = round(m[key], 2)
        else:
            # The photo-kinds table's retrieval column is the same Flickr8k test ranking.
            metrics["kinds_test_t2i_r10"] = round(m["t2i_r10"], 2)
        lines.append(f"{split}: {m['t2i_r1']:.1f} / {m['t2i_r5']:.1f} / {m['t2i_r10']:.1f}")
    manifest["metrics"] = metrics
    manifest.pop("format", None)
    save_head(out, manifest, arrays)
    return lines


def study(
    head: Head, data: Prepared, bank_sizes: list[int], seed: int
) -> tuple[list[str], list[tuple[Setting, Matrix]]]:
    """Markdown lines: plain and dev-chosen corrected recall on dev and test, per bank size; and per bank size
    the setting chosen on dev with its bank."""
    splits = {name: projected(head, data.splits[name]) for name in ("dev", "test")}
    scores = {name: (t @ i.T).astype(np.float32) for name, (i, t) in splits.items()}
    plain = {name: recalls(scores[name], data.splits[name]) for name in splits}
    lines = [
        "| ranking | bank (training captions) | dev R@1 / R@5 / R@10 | test R@1 / R@5 / R@10 |",
        "|---|---:|---|---|",
    ]

    def cell(m: dict[str, float]) -> str:
        return f"{m['t2i_r1']:.1f} / {m['t2i_r5']:.1f} / {m['t2i_r10']:.1f}"

    lines.append(f"| plain cosine | - | {cell(plain['dev'])} | {cell(plain['test'])} |")
    choices: list[tuple[Setting, Matrix]] = []
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
        choices.append((chosen, bank))
    return lines, choices


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="Flickr8k directory")
    parser.add_argument("--model-dir", type=Path, default=Path("models"))
    parser.add_argument("--head", type=Path, default=Path("heads/default.npz"))
    parser.add_argument(
        "--bank-sizes", type=int, nargs="+", default=[0, 5000, 1000], help="caption bank sizes (0 = every caption)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--write", type=Path, help="write the head with the first bank size's chosen correction folded in here"
    )
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
    plain = unfolded(head)
    lines, choices = study(plain, data, args.bank_sizes, args.seed)
    if args.write:
        setting, bank = choices[0]
        folded, tried = fold(plain, data, bank, setting)
        assert folded.search_hub is not None
        written = write_folded(folded, args.head, args.write, data, tried)
        lines.append(
            f"| folded into the vectors, scale {folded.search_hub.scale:g} (written to {args.write}) "
            f"| {len(bank):,} | {written[0].split(': ')[1]} | {written[1].split(': ')[1]} |"
        )
    lines.append("")
    cmd = ["python", "-m", "imgsearch.training.retrieval_hubness", *(sys.argv[1:] if argv is None else argv)]
    lines.append(f"head {args.head.name}; command: {shlex.join(cmd)}")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
