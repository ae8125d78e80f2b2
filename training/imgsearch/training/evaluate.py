"""Evaluate ConSE and learned heads on one test split; print the table, write JSON, Markdown and curves."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from imgsearch.heads import Head, load_head, read_head_manifest
from imgsearch.kit.errors import ImgsearchError
from imgsearch.models.manifest import ModelManifest
from imgsearch.training.data import Prepared, SplitData, prepare
from imgsearch.training.features import Matrix
from imgsearch.training.kinds import kinds_markdown, kinds_report
from imgsearch.training.metrics import (
    best_of_ranks,
    median_rank,
    recall_at,
    tag_metrics,
    target_ranks,
    triplet_accuracy,
)

log = logging.getLogger("imgsearch.training.evaluate")


def retrieval_metrics(head: Head, split: SplitData, views: Sequence[str] = ("orig",)) -> dict[str, float]:
    """Text->image R@1/5/10/20, median rank and triplet accuracy; image->text R@1/5/10 (all in percent).

    Text->image ranks as the gateway searches: captions as the head's search queries against the images it
    stores (with a search hubness correction, each image's offset counts); image->text against the plain
    projected captions."""
    feats, logits = split.features.averaged(views)
    images = head.project_images(feats, logits if head.needs_logits else None)
    texts = head.project_texts(split.text_embeddings)
    scores = (head.search_queries(texts) @ images.T).astype(np.float32)
    ranks = target_ranks(scores, split.text_image)
    i2t = best_of_ranks((images @ texts.T).astype(np.float32), split.image_texts())
    out = {f"t2i_r{k}": recall_at(ranks, k) for k in (1, 5, 10, 20)}
    out["t2i_medr"] = median_rank(ranks)
    out["i2t_r1"], out["i2t_r5"], out["i2t_r10"] = (recall_at(i2t, k) for k in (1, 5, 10))
    out["triplet_acc"] = triplet_accuracy(scores, split.text_image)
    return out


def selection_score(metrics: dict[str, float]) -> float:
    """What model selection maximises on the dev split: mean text->image recall at 1, 5, 10 and 20."""
    return float(np.mean([metrics[f"t2i_r{k}"] for k in (1, 5, 10, 20)]))


def tag_scores(head: Head, split: SplitData, tags: Matrix, views: Sequence[str]) -> Matrix:
    """Tag scores exactly as the tagger ranks them: the head's tag direction . projected tag, plus its tag bias."""
    feats, logits = split.features.averaged(views)
    images = head.tag_direction(feats, logits if head.needs_logits else None)
    projected = head.project_texts(tags)
    return (images @ projected.T + head.tag_bias(projected)[None, :]).astype(np.float32)


def tagging_metrics(head: Head, data: Prepared, split: SplitData, views: Sequence[str]) -> dict[str, float]:
    """Seen and unseen tag ranking, each among its own tag set (the zero-shot protocol of Fast0Tag)."""
    out: dict[str, float] = {}
    for which, tags in (("seen", data.seen), ("unseen", data.unseen)):
        if not tags:
            continue
        truth = np.array([[t in set(img) for t in tags] for img in split.tags], dtype=bool)
        scores = tag_scores(head, split, data.tag_matrix(tags), views)
        for k, v in tag_metrics(scores, truth).items():
            out[f"{which}_{k}"] = v
    return out


@dataclass
class Row:
    """One line of the table: a head evaluated with a given set of views."""

    name: str
    description: str
    image_model: str
    tta: bool
    metrics: dict[str, float]
    manifest: dict[str, Any]


def evaluate_head(head: Head, data: Prepared, split: str, views: Sequence[str]) -> dict[str, float]:
    part = data.splits[split]
    return {**retrieval_metrics(head, part, views), **tagging_metrics(head, data, part, views)}


def head_files(paths: Sequence[Path]) -> list[Path]:
    files: list[Path] = []
    for p in paths:
        if not p.exists():
            log.warning("no heads at %s; skipped", p)
            continue
        files.extend(sorted(p.glob("*.npz")) if p.is_dir() else [p])
    return [f for f in files if not f.name.endswith(".tmp.npz")]


def describe(manifest: dict[str, Any]) -> str:
    cfg = manifest.get("config", {})
    if not cfg:
        return str(manifest.get("kind", ""))
    parts = [cfg.get("kind", ""), cfg.get("loss", "")]
    if cfg.get("target") == "bow":
        parts.append("BoW targets")
    if cfg.get("text_adapter"):
        parts.append("text adapter")
    if cfg.get("holdout"):
        parts.append("unseen held out")
    if float(manifest.get("conse_weight", 0.0)) > 0:
        parts.append(f"ConSE blend {float(manifest['conse_weight']):.2f}")
    gate = manifest.get("tag_gate") or {}
    if gate.get("signal") == "linear":
        knn = " or kNN in-domain gate" if manifest.get("tag_gate_max") else ""
        hub = ", hubness-corrected" if manifest.get("tag_hub") else ""
        mix = manifest.get("tag_mix")
        raw = f", ConSE at T {float(mix['temperature']):g} also in MiniLM space" if mix else ""
        parts.append(f"tags: ConSE weight by a photo-kind gate{knn}{hub}{raw}")
    elif manifest.get("tag_conse_weight") is not None:
        # The tag columns use the tag setting (imgsearch.training.tagging), not the search blend.
        tag_w, tag_p = float(manifest["tag_conse_weight"]), float(manifest.get("tag_anchor_penalty", 0.0))
        parts.append(f"tags: blend {tag_w:.2f}, anchor penalty {tag_p:.2f}")
    search_hub = manifest.get("search_hub")
    if search_hub:
        parts.append(f"search: hubness-corrected ({search_hub.get('bank_captions', '?')} captions, folded)")
    return ", ".join(p for p in parts if p)


def run(
    data_path: Path, model_dirs: Sequence[Path], heads: Sequence[Path], split: str, tta: bool, progress: bool
) -> list[Row]:
    rows: list[Row] = []
    files = head_files(heads)
    for model_dir in model_dirs:
        if not (model_dir / "manifest.json").exists():
            log.warning("no exported models in %s; skipped", model_dir)
            continue
        data = prepare(data_path, model_dir, progress=progress)
        version = ModelManifest.load(model_dir).image_version
        model_name = version.split("@")[0]
        conse = data.conse()
        view_sets = [("orig",), ("orig", "flip")] if tta else [("orig",)]
        candidates: list[tuple[str, Head, dict[str, Any]]] = [("conse", conse, {"kind": "conse"})]
        for f in files:
            manifest = read_head_manifest(f)
            if str(manifest.get("image_model", "")).split("@")[0] != model_name:
                continue
            try:
                head: Head = load_head(f, image_model=version, feature_dim=1280, text_dim=384, conse=conse)
            except ImgsearchError as exc:
                log.warning("skipping %s: %s", f.name, exc)
                continue
            candidates.append((f.stem, head, manifest))
        for name, head, manifest in candidates:
            for views in view_sets:
                t0 = time.perf_counter()
                metrics = evaluate_head(head, data, split, views)
                log.info("%s %s on %s in %.1fs", name, "+".join(views), model_name, time.perf_counter() - t0)
                trained_unseen = bool(manifest.get("config")) and not manifest.get("config", {}).get("holdout")
                if trained_unseen:
                    # Trained on every tag: its "unseen" numbers are not zero-shot and are not reported as such.
                    metrics = {k: v for k, v in metrics.items() if not k.startswith("unseen_")}
                rows.append(
                    Row(
                        name=name,
                        description=describe(manifest) if name != "conse" else "ConSE (training-free, top-10)",
                        image_model=model_name,
                        tta=len(views) > 1,
                        metrics=metrics,
                        manifest=manifest,
                    )
                )
    return rows


COLUMNS = (
    ("t2i_r1", "T→I R@1"),
    ("t2i_r5", "R@5"),
    ("t2i_r10", "R@10"),
    ("t2i_r20", "R@20"),
    ("t2i_medr", "MedR"),
    ("i2t_r1", "I→T R@1"),
    ("i2t_r5", "R@5"),
    ("i2t_r10", "R@10"),
    ("triplet_acc", "Triplet acc"),
    ("seen_hit@1", "Seen hit@1"),
    ("seen_p@5", "Seen P@5"),
    ("seen_miap", "Seen MiAP"),
    ("unseen_hit@1", "Unseen hit@1"),
    ("unseen_p@5", "Unseen P@5"),
    ("unseen_miap", "Unseen MiAP"),
)


def label(row: Row) -> str:
    model = "" if row.image_model == "efficientnet-lite0" else f" [{row.image_model}]"
    return f"{row.name}{model}{' +flip TTA' if row.tta else ''}"


def markdown_table(rows: Sequence[Row]) -> str:
    head = "| Head | What | " + " | ".join(c for _, c in COLUMNS) + " |"
    sep = "|---|---|" + "---:|" * len(COLUMNS)
    lines = [head, sep]
    for r in rows:
        cells = []
        for key, _ in COLUMNS:
            v = r.metrics.get(key)
            cells.append("-" if v is None else f"{v:.0f}" if key == "t2i_medr" else f"{v:.1f}")
        lines.append(f"| {label(r)} | {r.description} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plain_table(rows: Sequence[Row]) -> str:
    keys = [k for k, _ in COLUMNS]
    width = max(len(label(r)) for r in rows) + 2
    out = ["head".ljust(width) + "".join(k.rjust(13) for k in keys)]
    for r in rows:
        vals = "".join((f"{r.metrics[k]:.1f}" if k in r.metrics else "-").rjust(13) for k in keys)
        out.append(label(r).ljust(width) + vals)
    return "\n".join(out)


BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"


def write_markdown(path: Path, table: str, command: str) -> None:
    """Put the table between the results markers of an existing document, or write a new one."""
    block = f"{BEGIN}\n\nReproduce: `{command}`\n\n{table}\n\n{END}"
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    if BEGIN in text and END in text:
        text = text[: text.index(BEGIN)] + block + text[text.index(END) + len(END) :]
    else:
        text = (text.rstrip() + "\n\n" if text else "# Evaluation\n\n") + block + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


def plot_curves(rows: Sequence[Row], path: Path) -> bool:
    """Dev R@10 and training loss per epoch of every trained head (from the histories in their manifests)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seen: set[str] = set()
    histories = []
    for r in rows:
        h = r.manifest.get("history")
        if h and r.name not in seen:
            seen.add(r.name)
            histories.append((label(r).replace(" +flip TTA", ""), h))
    if not histories:
        return False
    fig, (ax_loss, ax_r10) = plt.subplots(1, 2, figsize=(13, 5))
    cmap = plt.get_cmap("tab20")
    colours = [cmap(i) for i in range(20)]
    for i, (name, h) in enumerate(histories):
        epochs = h["epoch"]
        loss = np.asarray(h["train_loss"], dtype=np.float64)
        style = {"color": colours[i % len(colours)], "linestyle": "-" if i < len(colours) else "--", "label": name}
        # Losses differ in scale; each curve is shown relative to its first epoch.
        ax_loss.plot(epochs, loss / max(loss[0], 1e-12), **style)
        ax_r10.plot(epochs, h["dev_t2i_r10"], **style)
    ax_loss.set(xlabel="epoch", ylabel="training loss / first-epoch loss", title="Training loss (relative)")
    ax_r10.set(xlabel="epoch", ylabel="dev text→image R@10 (%)", title="Dev R@10 (Flickr8k dev, 1000 images)")
    ax_r10.legend(fontsize=7, loc="lower right")
    for ax in (ax_loss, ax_r10):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


KINDS_BEGIN, KINDS_END = "<!-- photo-kinds:begin -->", "<!-- photo-kinds:end -->"


def kinds_section(report: dict[str, Any]) -> str:
    """The Markdown block of the served-tagging table over the three kinds of photos."""
    return f"{KINDS_BEGIN}\n\nReproduce: `{report['command']}`\n\n{kinds_markdown(report['rows'])}\n\n{KINDS_END}"


def write_block(path: Path, block: str, begin: str, end: str) -> None:
    """Replace the text between `begin` and `end` of a document, or append the block."""
    text = path.read_text(encoding="utf-8") if path.exists() else "# Evaluation\n"
    if begin in text and end in text:
        text = text[: text.index(begin)] + block + text[text.index(end) + len(end) :]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text, encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", type=Path, required=True, help="dataset (Flickr8k dir, COCO root/JSON, tag folder)")
    parser.add_argument(
        "--model-dir", type=Path, action="append", help="exported models (repeat for other image models)"
    )
    parser.add_argument("--heads", type=Path, nargs="+", default=[Path("heads")], help="head files or directories")
    parser.add_argument("--split", default="test", help="split to evaluate on (test for the final table)")
    parser.add_argument("--tta", action="store_true", help="also evaluate every head with horizontal-flip averaging")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--markdown", type=Path, help="write the Markdown table here")
    parser.add_argument("--plot", type=Path, help="write the training curves (PNG) here")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument(
        "--objects", type=Path, help="folder with imagenette/ and caltech101/: adds the served-tagging table by kind"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    model_dirs = args.model_dir or [Path("models")]
    rows = run(args.data, model_dirs, args.heads, args.split, args.tta, progress=not args.quiet)
    print(plain_table(rows))
    command = "python -m imgsearch.training.evaluate " + " ".join(sys.argv[1:] if argv is None else argv)
    if args.json:
        # Other tools keep their own keys in this file (imgsearch.training.tagging: served_tagging).
        previous = json.loads(args.json.read_text()) if args.json.exists() else {}
        payload = {
            **previous,
            "dataset": str(args.data.name),
            "split": args.split,
            "command": command,
            "rows": [
                {
                    "head": r.name,
                    "label": label(r),
                    "description": r.description,
                    "image_model": r.image_model,
                    "tta": r.tta,
                    "metrics": r.metrics,
                }
                for r in rows
            ],
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
    if args.markdown:
        write_markdown(args.markdown, markdown_table(rows), command)
    if args.plot:
        plot_curves(rows, args.plot)
    if args.objects:
        report = kinds_report(args.data, model_dirs[0], args.objects, args.heads, command)
        print(kinds_markdown(report["rows"]))
        if args.json:
            payload = json.loads(args.json.read_text())
            payload["photo_kinds"] = report
            args.json.write_text(json.dumps(payload, indent=2) + "\n")
        if args.markdown:
            write_block(args.markdown, kinds_section(report), KINDS_BEGIN, KINDS_END)
    return 0


if __name__ == "__main__":
    sys.exit(main())
