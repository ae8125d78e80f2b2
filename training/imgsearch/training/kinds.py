"""Served tag ranking on each kind of photo: Flickr8k (people, scenes), Imagenette and Caltech-101 (objects).

Every head ranks the served starter vocabulary as `Tagger.rank` does. Flickr8k: P@5, hit@1 and MiAP against
the caption words (`tagging.served_truth`). Imagenette: hit@1/hit@5 of the photo's class names. Caltech-101:
the class names missing from the starter vocabulary are added as unseen tags (as an operator adds tags live),
then hit@1/hit@5 over the whole vocabulary, and over the added tags alone for the photos whose class was
missing ("unseen", the tagger's `which=unseen`). Hub: the share of photos whose top 5 hold the single most
frequent tag (lower is better; Radovanovic et al. 2010).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from imgsearch.heads import ConSEHead, Head, load_head, read_head_manifest, save_head
from imgsearch.heads.model import CONSE_DESCRIPTION
from imgsearch.kit.errors import ImgsearchError
from imgsearch.training.data import SplitData, prepare
from imgsearch.training.features import OnnxTextModel, cached_text_embeddings
from imgsearch.training.objects import ObjectSet, head_scores, hits_at, hubness, load_object_set, object_truth
from imgsearch.training.tagging import Vocabulary, fold, served_metrics, served_truth, served_vocabulary

log = logging.getLogger("imgsearch.training.kinds")


@dataclass
class KindsData:
    """Everything the by-kind evaluation ranks: a Flickr8k split, the object sets and their vocabularies."""

    flickr: SplitData
    vocab: Vocabulary
    flickr_truth: npt.NDArray[np.bool_]
    imagenette: ObjectSet
    imagenette_truth: npt.NDArray[np.bool_]
    caltech: ObjectSet
    caltech_vocab: Vocabulary
    caltech_truth: npt.NDArray[np.bool_]
    caltech_unseen: npt.NDArray[np.bool_]  # [tags]: added at run time


def load_kinds(flickr: SplitData, model_dir: Path, objects_dir: Path) -> KindsData:
    vocab = served_vocabulary(model_dir)
    imagenette = load_object_set(objects_dir / "imagenette", model_dir)
    caltech = load_object_set(objects_dir / "caltech101", model_dir)
    keys = {fold(n) for n in vocab.names}
    missing = [n for n in caltech.class_names() if fold(n) not in keys]
    emb = cached_text_embeddings(OnnxTextModel(model_dir), missing, "caltech-missing", progress=False)
    caltech_vocab = Vocabulary(vocab.names + missing, np.concatenate([vocab.embeddings, emb]))
    unseen = np.array([False] * len(vocab.names) + [True] * len(missing))
    return KindsData(
        flickr=flickr,
        vocab=vocab,
        flickr_truth=served_truth(vocab.names, flickr.tags),
        imagenette=imagenette,
        imagenette_truth=object_truth(vocab.names, imagenette.names),
        caltech=caltech,
        caltech_vocab=caltech_vocab,
        caltech_truth=object_truth(caltech_vocab.names, caltech.names),
        caltech_unseen=unseen,
    )


def kinds_metrics(head: Head, d: KindsData) -> dict[str, float]:
    """Every by-kind number of one head (percent)."""
    feats, logits = d.flickr.features.view("orig")
    f = served_metrics(head_scores(head, feats, logits, d.vocab.embeddings), d.flickr_truth)
    out = {"flickr_p@5": f["p@5"], "flickr_hit@1": f["hit@1"], "flickr_miap": f["miap"]}
    s = head_scores(head, d.imagenette.features, d.imagenette.logits, d.vocab.embeddings)
    out.update({f"imagenette_{k}": v for k, v in hits_at(s, d.imagenette_truth).items()})
    out["imagenette_hub"] = hubness(s)["top_hub_share"]
    s = head_scores(head, d.caltech.features, d.caltech.logits, d.caltech_vocab.embeddings)
    out.update({f"caltech_{k}": v for k, v in hits_at(s, d.caltech_truth).items()})
    out["caltech_hub"] = hubness(s)["top_hub_share"]
    # Unseen protocol: the added names ranked among themselves, on the photos whose class was missing.
    rows = d.caltech_truth[:, d.caltech_unseen].any(axis=1)
    su = s[np.ix_(rows, d.caltech_unseen)]
    out.update(
        {f"caltech_unseen_{k}": v for k, v in hits_at(su, d.caltech_truth[np.ix_(rows, d.caltech_unseen)]).items()}
    )
    out["caltech_unseen_hub"] = hubness(su)["top_hub_share"]
    return out


def mean_gain(m: dict[str, float], base: dict[str, float]) -> float:
    """Selection score against a reference: the mean of the object-photo hit gains and the Flickr8k MiAP gain."""
    keys = ("imagenette_hit@1", "imagenette_hit@5", "caltech_hit@1", "caltech_hit@5")
    return float(np.mean([m[k] - base[k] for k in keys]) + (m["flickr_miap"] - base["flickr_miap"]))


COLUMNS = (
    ("flickr_p@5", "F8k P@5"),
    ("flickr_hit@1", "F8k hit@1"),
    ("flickr_miap", "F8k MiAP"),
    ("t2i_r10", "F8k T→I R@10"),
    ("imagenette_hit@1", "INette hit@1"),
    ("imagenette_hit@5", "INette hit@5"),
    ("imagenette_hub", "INette hub"),
    ("caltech_hit@1", "Caltech hit@1"),
    ("caltech_hit@5", "Caltech hit@5"),
    ("caltech_hub", "Caltech hub"),
    ("caltech_unseen_hit@1", "Caltech unseen hit@1"),
    ("caltech_unseen_hit@5", "Caltech unseen hit@5"),
    ("caltech_unseen_hub", "Caltech unseen hub"),
)


def kinds_markdown(rows: Sequence[dict[str, Any]]) -> str:
    lines = [
        "| Head | Intended use | " + " | ".join(c for _, c in COLUMNS) + " |",
        "|---|---|" + "---:|" * len(COLUMNS),
    ]
    for r in rows:
        cells = ["-" if r["metrics"].get(k) is None else f"{r['metrics'][k]:.1f}" for k, _ in COLUMNS]
        lines.append(f"| {r['label']} | {r['description']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def heads_to_rank(heads: Sequence[Path], image_model: str, conse: ConSEHead) -> list[tuple[str, Head, str]]:
    """ConSE (as the tagger serves it) and every installed head file that loads for this image model."""
    out: list[tuple[str, Head, str]] = [("conse", conse, CONSE_DESCRIPTION)]
    files = sorted(f for p in heads if p.is_dir() for f in p.glob("*.npz") if not f.name.endswith(".tmp.npz"))
    files += [p for p in heads if p.is_file()]
    for f in files:
        manifest = read_head_manifest(f)
        if str(manifest.get("image_model", "")).split("@")[0] != image_model.split("@")[0]:
            continue
        try:
            head = load_head(f, image_model=image_model, feature_dim=1280, text_dim=384, conse=conse)
        except ImgsearchError as exc:
            log.warning("skipping %s: %s", f.name, exc)
            continue
        out.append((f.stem, head, str(manifest.get("description", ""))))
    return out


def kinds_report(
    data_path: Path, model_dir: Path, objects_dir: Path, heads: Sequence[Path], command: str, split: str = "test"
) -> dict[str, Any]:
    """The by-kind table for ConSE and every head in `heads` (directories: only their top-level files)."""
    from imgsearch.training.evaluate import retrieval_metrics

    data = prepare(data_path, model_dir, progress=False)
    conse = data.conse()
    d = load_kinds(data.splits[split], model_dir, objects_dir)
    rows = []
    for name, head, description in heads_to_rank(heads, data.image_model, conse):
        m = kinds_metrics(head, d)
        m["t2i_r10"] = retrieval_metrics(head, data.splits[split])["t2i_r10"]
        label = f"{name} (served default)" if name == "default" else name
        rows.append({"head": name, "label": label, "description": description, "metrics": m})
        log.info("%s: %s", name, json.dumps({k: round(v, 1) for k, v in m.items()}))
    return {
        "command": command,
        "split": split,
        "vocabulary_size": len(d.vocab.names),
        "caltech_added_tags": [n for n, u in zip(d.caltech_vocab.names, d.caltech_unseen, strict=True) if u],
        "rows": rows,
    }


# What each shipped head is for (manifest "description", shown by ListHeads).
DESCRIPTIONS = {
    "linear-infonce": "scenes and people (Flickr8k-like photos); weak on object photos (no ConSE): search and tags",
}


def annotate(path: Path, description: str, metrics: dict[str, float], prefix: str) -> None:
    """Store the head's intended use and its by-kind numbers (keys `<prefix>_<metric>`) in its manifest."""
    with np.load(path, allow_pickle=False) as data:
        arrays = {k: np.asarray(data[k]) for k in data.files if k != "manifest"}
        manifest: dict[str, Any] = json.loads(bytes(data["manifest"]).decode("utf-8"))
    if description:
        manifest["description"] = description
    kept = {k: v for k, v in manifest.get("metrics", {}).items() if not k.startswith(f"{prefix}_")}
    manifest["metrics"] = {**kept, **{f"{prefix}_{k}": round(float(v), 2) for k, v in metrics.items()}}
    save_head(path, manifest, arrays)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="folder with flickr8k/, imagenette/, caltech101/")
    parser.add_argument("--model-dir", type=Path, default=Path("models"))
    parser.add_argument("--heads", type=Path, nargs="+", default=[Path("heads")])
    parser.add_argument("--split", default="test", help="Flickr8k split of the table")
    parser.add_argument("--annotate", action="store_true", help="store description + numbers in the head files")
    parser.add_argument("--json", type=Path, help="add the table under the key `photo_kinds` of this JSON")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    command = "python -m imgsearch.training.kinds " + " ".join(sys.argv[1:] if argv is None else argv)
    report = kinds_report(args.data / "flickr8k", args.model_dir, args.data, args.heads, command, args.split)
    print(kinds_markdown(report["rows"]))
    if args.json:
        payload = json.loads(args.json.read_text()) if args.json.exists() else {}
        payload["photo_kinds"] = report
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
    if args.annotate:
        files = {f.stem: f for p in args.heads for f in (sorted(p.glob("*.npz")) if p.is_dir() else [p])}
        for row in report["rows"]:
            if row["head"] in files:
                description = row["description"] or DESCRIPTIONS.get(row["head"], "")
                annotate(files[row["head"]], description, row["metrics"], f"kinds_{args.split}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
