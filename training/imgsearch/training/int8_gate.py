"""Quality gates of the int8 image and text models: int8 against fp32 on retrieval and tagging, into the manifest.

    python -m imgsearch.training.int8_gate --data ../shared/data --model-dir models [--only image|text]

(a) Flickr8k 1k-test text -> image R@10 with the served default head, and (b) tag hit@5 on Imagenette and
Caltech-101 object photos, ranking the served starter vocabulary as the tagger does (a hit: one of the top
5 tags names the photo's class). Image gate: both image models see exactly the same decoded pixels, texts
are fp32. Text gate (after the image gate): the images are encoded once by the image variant an auto CPU
encoder serves, and every text the served path embeds (queries, tag vocabulary, the ConSE class names) comes
from the fp32 or the int8 text model. Pass: R@10 drops by at most 0.5 points and hit@5 by at most 1 point
on each photo set. The numbers and the pass flag are written into the model manifest, where the encoder reads
them (IMGSEARCH_ENCODER_IMAGE_PRECISION / TEXT_PRECISION=auto serve int8 on CPU only when that model's gate
passed on exactly that int8 file).
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import logging
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import numpy as np

from imgsearch.heads import ConSEHead, Head, load_head
from imgsearch.models.manifest import Int8Model, ModelManifest, QualityGate
from imgsearch.models.runtime import ImageModel, Matrix, RuntimeOptions, TextModel, choose_image_variant
from imgsearch.tagger.core import starter_vocabulary
from imgsearch.training.data import SplitData
from imgsearch.training.datasets import open_dataset
from imgsearch.training.evaluate import retrieval_metrics
from imgsearch.training.features import ImageFeatures, OnnxTextModel, cached_text_embeddings, training_options
from imgsearch.training.tagging import Vocabulary, fold, served_scores, served_vocabulary

log = logging.getLogger("imgsearch.training.int8_gate")

MAX_R10_DROP = 0.5  # points of text -> image R@10 on Flickr8k test
MAX_HIT5_DROP = 1.0  # points of tag hit@5, on each object-photo set
OBJECT_SETS = ("imagenette", "caltech101")
COMMAND = "python -m imgsearch.training.int8_gate --data ../shared/data --model-dir models"
Row = tuple[str, str, float, float, float, bool]


@dataclass
class Features:
    """fp32 and int8 outputs for the same decoded pixels, and the model time each took."""

    fp32: tuple[Matrix, Matrix]
    int8: tuple[Matrix, Matrix]
    fp32_s: float
    int8_s: float


def run_both(fp32: ImageModel, int8: ImageModel, paths: Sequence[Path], batch: int, what: str) -> Features:
    """Decode each image once (the encoder's decoder) and run both models on the same batch, alternating."""
    n = len(paths)
    out = {k: (np.zeros((n, 1280), np.float32), np.zeros((n, 1000), np.float32)) for k in ("fp32", "int8")}
    spent = {"fp32": 0.0, "int8": 0.0}
    with ThreadPoolExecutor(max_workers=2) as pool:
        for b, start in enumerate(range(0, n, batch)):
            chunk = paths[start : start + batch]
            pixels = np.stack(list(pool.map(lambda p: fp32.preprocess_file(p), chunk)))
            # Alternate which model goes first, so neither always runs on a warmer cache.
            order = (("fp32", fp32), ("int8", int8)) if b % 2 == 0 else (("int8", int8), ("fp32", fp32))
            for key, model in order:
                t0 = time.perf_counter()
                f, lg = model.run(pixels)
                spent[key] += time.perf_counter() - t0
                out[key][0][start : start + len(chunk)] = f
                out[key][1][start : start + len(chunk)] = lg
    log.info("%s: %d images, fp32 %.1fs, int8 %.1fs", what, n, spent["fp32"], spent["int8"])
    return Features(out["fp32"], out["int8"], spent["fp32"], spent["int8"])


def flickr_r10(
    data: Path, model_dir: Path, head_path: Path, fp32: ImageModel, int8: ImageModel, batch: int
) -> tuple[dict[str, float], Features]:
    """Text -> image R@10 on the Flickr8k test split (1000 images, 5000 captions), fp32 and int8."""
    samples = [s for s in open_dataset(data / "flickr8k").samples() if s.split == "test"]
    texts = [t for s in samples for t in s.texts]
    text_image = np.concatenate([np.full(len(s.texts), i) for i, s in enumerate(samples)]).astype(np.int64)
    text_model = OnnxTextModel(model_dir)
    text_emb = cached_text_embeddings(text_model, texts, "int8-gate-flickr8k-test", progress=False)
    labels = [str(x) for x in json.loads((model_dir / fp32.manifest.labels_file).read_text())]
    class_emb = cached_text_embeddings(text_model, labels, "imagenet-labels", progress=False)
    feats = run_both(fp32, int8, [s.image for s in samples], batch, "flickr8k test")
    names = [s.image.name for s in samples]
    out: dict[str, float] = {}
    for key, model, (f, lg) in (("fp32", fp32, feats.fp32), ("int8", int8, feats.int8)):
        # Each variant checks the head against the version it serves: the int8 one carries "+int8" after
        # the fp32 hash and must still be accepted for this fp32-trained head (same name before the "@").
        conse = ConSEHead(class_embeddings=class_emb, image_model=model.version)
        head: Head = load_head(head_path, image_model=model.version, feature_dim=1280, text_dim=384, conse=conse)
        split = SplitData(
            names=names,
            features=ImageFeatures(names, ("orig",), f[None], lg[None]),
            texts=texts,
            text_image=text_image,
            text_embeddings=text_emb,
            bow_embeddings=np.zeros((0, 384), np.float32),
            tags=[[] for _ in names],
        )
        out[key] = retrieval_metrics(head, split)["t2i_r10"]
    return out, feats


def object_photos(root: Path) -> tuple[list[Path], list[set[str]]]:
    """Photos and their class names (labels.csv: file, class id, names separated by |)."""
    paths: list[Path] = []
    classes: list[set[str]] = []
    with (root / "labels.csv").open(newline="", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            paths.append(root / "images" / row["file"])
            classes.append({fold(n.strip()) for n in row["names"].split("|") if n.strip()})
    return paths, classes


def hit_at_5(head: Head, features: Matrix, logits: Matrix, vocab: Vocabulary, classes: Sequence[set[str]]) -> float:
    """Percent of photos with a top-5 tag (as the tagger ranks the served vocabulary) naming their class."""
    scores = served_scores(head, features, logits, vocab.embeddings)
    top = np.argsort(-scores, axis=1, kind="stable")[:, :5]
    keys = [fold(n) for n in vocab.names]
    hits = [any(keys[j] in want for j in row) for row, want in zip(top, classes, strict=True)]
    return float(100.0 * np.mean(hits))


def record_gate(
    model_dir: Path, field: Literal["image_int8", "text_int8"], sha256: str, passed: bool, metrics: dict[str, float]
) -> int:
    """Record a gate's result on the manifest's `field` entry; exit status 0 passed, 1 failed, 2 not recorded."""
    gate = QualityGate(
        passed=passed,
        int8_sha256=sha256,
        metrics={k: round(float(v), 4) for k, v in metrics.items()},
        thresholds={"max_r10_drop": MAX_R10_DROP, "max_hit5_drop": MAX_HIT5_DROP},
        command=COMMAND,
        measured_at=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    )
    # Reload: the manifest may have changed while the gate ran; only record the gate if the file is the same.
    current = ModelManifest.load(model_dir)
    entry: Int8Model | None = getattr(current, field)
    if entry is None or entry.sha256 != sha256:
        print(f"the {field.replace('_', ' ')} model changed while the gate ran; nothing recorded", file=sys.stderr)
        return 2
    gated = replace(entry, gate=gate)
    updated = replace(current, image_int8=gated) if field == "image_int8" else replace(current, text_int8=gated)
    updated.save(model_dir)
    print(f"recorded in {model_dir / 'manifest.json'}")
    return 0 if passed else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="folder with flickr8k/, imagenette/, caltech101/")
    parser.add_argument("--model-dir", type=Path, default=Path("models"))
    parser.add_argument("--head", type=Path, default=Path("heads/default.npz"), help="the served default head")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=0, help="ONNX Runtime intra-op threads (0 = default)")
    parser.add_argument("--only", choices=("image", "text"), help="gate one model (default: image, then text)")
    parser.add_argument("--dry-run", action="store_true", help="print the table but leave the manifest alone")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    logging.getLogger("imgsearch.heads").setLevel(logging.ERROR)  # the expected "+int8" version warning
    codes = []
    # Image first: the text gate encodes its photos with the image variant that result makes the encoder serve.
    if args.only in (None, "image"):
        codes.append(gate_image(args))
    if args.only in (None, "text"):
        codes.append(gate_text(args))
    return max(codes)


def print_rows(rows: Sequence[Row], variant_names: tuple[str, str] = ("fp32", "int8")) -> None:
    print(f"| set | metric | {variant_names[0]} | {variant_names[1]} | drop (points) | limit | pass |")
    print("|---|---|---:|---:|---:|---:|---|")
    for label, metric, a, b, d, ok in rows:
        limit = MAX_R10_DROP if metric.endswith("R@10") else MAX_HIT5_DROP
        print(f"| {label} | {metric} | {a:.2f} | {b:.2f} | {d:+.2f} | {limit:.1f} | {'yes' if ok else 'NO'} |")


def set_label(name: str, n: int) -> str:
    return f"{'Imagenette' if name == 'imagenette' else 'Caltech-101'} ({n})"


def gate_image(args: argparse.Namespace) -> int:
    """The static int8 image model against fp32 (texts by the fp32 text model); records image_int8.gate."""
    manifest = ModelManifest.load(args.model_dir)
    q = manifest.image_int8
    if q is None or not manifest.int8_intact(args.model_dir):
        print(f"no intact int8 image model in {args.model_dir}: run `make models` first", file=sys.stderr)
        return 2
    options = training_options(args.threads)
    fp32 = ImageModel(args.model_dir, options, manifest=manifest)
    int8 = ImageModel(args.model_dir, options, manifest=manifest.serving("int8"))

    r10, flickr = flickr_r10(args.data, args.model_dir, args.head, fp32, int8, args.batch)
    rows: list[Row] = []
    drop = r10["fp32"] - r10["int8"]
    rows.append(("Flickr8k test (1k)", "text→image R@10", r10["fp32"], r10["int8"], drop, drop <= MAX_R10_DROP))

    text_model = OnnxTextModel(args.model_dir)
    vocab = served_vocabulary(args.model_dir)
    labels = [str(x) for x in json.loads((args.model_dir / manifest.labels_file).read_text())]
    class_emb = cached_text_embeddings(text_model, labels, "imagenet-labels", progress=False)
    conse = ConSEHead(class_embeddings=class_emb, image_model=fp32.version)
    head = load_head(args.head, image_model=fp32.version, feature_dim=1280, text_dim=384, conse=conse)
    spent = [flickr]
    for name in OBJECT_SETS:
        paths, classes = object_photos(args.data / name)
        feats = run_both(fp32, int8, paths, args.batch, name)
        spent.append(feats)
        h32 = hit_at_5(head, *feats.fp32, vocab, classes)
        h8 = hit_at_5(head, *feats.int8, vocab, classes)
        rows.append((set_label(name, len(paths)), "tag hit@5", h32, h8, h32 - h8, h32 - h8 <= MAX_HIT5_DROP))

    fp32_s = sum(f.fp32_s for f in spent)
    int8_s = sum(f.int8_s for f in spent)
    images = len(flickr.fp32[0]) + sum(len(f.fp32[0]) for f in spent[1:])
    cos = np.concatenate([_cosines(f) for f in spent])
    top1 = float(np.mean(np.concatenate([f.fp32[1].argmax(1) == f.int8[1].argmax(1) for f in spent])))
    passed = all(r[5] for r in rows)

    print(f"\nint8 quality gate: {q.file} (sha {q.sha256[:12]}) against {manifest.image_file}\n")
    print_rows(rows)
    print(
        f"\nfeature cosine int8 vs fp32 over {images} photos: min {cos.min():.4f}, mean {cos.mean():.4f}; "
        f"ImageNet top-1 agreement {top1:.3f}; "
        f"model time on the same batches of {args.batch}: fp32 {fp32_s:.1f}s, int8 {int8_s:.1f}s "
        f"(int8 {fp32_s / int8_s:.2f}x faster)"
    )
    print(f"gate: {'PASSED' if passed else 'FAILED'}")

    metrics = {
        "flickr8k_t2i_r10_fp32": r10["fp32"],
        "flickr8k_t2i_r10_int8": r10["int8"],
        "feature_cosine_min": float(cos.min()),
        "feature_cosine_mean": float(cos.mean()),
        "top1_agreement": top1,
        "speedup_int8_over_fp32": fp32_s / int8_s,
        "images": float(images),
    }
    for (_label, _, a, b, _, _), name in zip(rows[1:], OBJECT_SETS, strict=True):
        metrics[f"{name}_hit5_fp32"] = a
        metrics[f"{name}_hit5_int8"] = b
    if args.dry_run:
        return 0 if passed else 1
    return record_gate(args.model_dir, "image_int8", q.sha256, passed, metrics)


@dataclass
class TextPair:
    """fp32 and int8 embeddings of the same texts, and the model time each took."""

    fp32: Matrix
    int8: Matrix
    fp32_s: float
    int8_s: float


def embed_both(fp32: TextModel, int8: TextModel, texts: Sequence[str], batch: int) -> TextPair:
    """Both text models on the same length-sorted batches, alternating which goes first."""
    n, dim = len(texts), fp32.manifest.text_dim
    out = {"fp32": np.zeros((n, dim), np.float32), "int8": np.zeros((n, dim), np.float32)}
    spent = {"fp32": 0.0, "int8": 0.0}
    order = sorted(range(n), key=lambda i: len(texts[i]))
    for b, start in enumerate(range(0, n, batch)):
        idx = order[start : start + batch]
        chunk = [texts[i] for i in idx]
        pairs = (("fp32", fp32), ("int8", int8)) if b % 2 == 0 else (("int8", int8), ("fp32", fp32))
        for key, model in pairs:
            t0 = time.perf_counter()
            out[key][idx] = model.run(chunk)
            spent[key] += time.perf_counter() - t0
    return TextPair(out["fp32"], out["int8"], spent["fp32"], spent["int8"])


def served_features(model: ImageModel, paths: Sequence[Path], batch: int) -> tuple[Matrix, Matrix]:
    """Features and logits of the served image model, decoded by the encoder's decoder."""
    feats, logits = [], []
    with ThreadPoolExecutor(max_workers=2) as pool:
        for start in range(0, len(paths), batch):
            pixels = np.stack(list(pool.map(model.preprocess_file, paths[start : start + batch])))
            f, lg = model.run(pixels)
            feats.append(f)
            logits.append(lg)
    return np.concatenate(feats), np.concatenate(logits)


def gate_text(args: argparse.Namespace) -> int:
    """The dynamic int8 text model against fp32 on the served image variant; records text_int8.gate."""
    manifest = ModelManifest.load(args.model_dir)
    q = manifest.text_int8
    if q is None or not manifest.text_int8_intact(args.model_dir):
        print(f"no intact int8 text model in {args.model_dir}: run `make models` first", file=sys.stderr)
        return 2
    options: RuntimeOptions = training_options(args.threads)
    # int8 text is for CPU encoders, so the photos are encoded by the image variant a CPU encoder on auto serves.
    choice = choose_image_variant("auto", manifest, on_gpu=False, int8_intact=manifest.int8_intact(args.model_dir))
    image = ImageModel(args.model_dir, options, manifest=manifest.serving(choice.variant))
    models = {
        "fp32": TextModel(args.model_dir, options, manifest=manifest),
        "int8": TextModel(args.model_dir, options, manifest=manifest.serving_text("int8")),
    }
    log.info("text gate on image model %s (%s)", image.version, choice.reason)

    # Every text the served path embeds, by each text model: queries, ImageNet class names (ConSE), vocabulary.
    samples = [s for s in open_dataset(args.data / "flickr8k").samples() if s.split == "test"]
    captions = [t for s in samples for t in s.texts]
    labels = [str(x) for x in json.loads((args.model_dir / manifest.labels_file).read_text())]
    vocab_names = starter_vocabulary(labels)
    pairs = {
        "captions": embed_both(models["fp32"], models["int8"], captions, args.batch),
        "labels": embed_both(models["fp32"], models["int8"], labels, args.batch),
        "vocabulary": embed_both(models["fp32"], models["int8"], vocab_names, args.batch),
    }
    heads: dict[str, Head] = {}
    for key in models:
        class_emb = getattr(pairs["labels"], key)
        conse = ConSEHead(class_embeddings=class_emb, image_model=image.version)
        heads[key] = load_head(args.head, image_model=image.version, feature_dim=1280, text_dim=384, conse=conse)

    rows: list[Row] = []
    feats, logits = served_features(image, [s.image for s in samples], args.batch)
    names = [s.image.name for s in samples]
    text_image = np.concatenate([np.full(len(s.texts), i) for i, s in enumerate(samples)]).astype(np.int64)
    r10: dict[str, float] = {}
    for key in models:
        split = SplitData(
            names=names,
            features=ImageFeatures(names, ("orig",), feats[None], logits[None]),
            texts=captions,
            text_image=text_image,
            text_embeddings=getattr(pairs["captions"], key),
            bow_embeddings=np.zeros((0, 384), np.float32),
            tags=[[] for _ in names],
        )
        r10[key] = retrieval_metrics(heads[key], split)["t2i_r10"]
    drop = r10["fp32"] - r10["int8"]
    rows.append(("Flickr8k test (1k)", "text→image R@10", r10["fp32"], r10["int8"], drop, drop <= MAX_R10_DROP))
    hits: dict[str, tuple[float, float]] = {}
    for name in OBJECT_SETS:
        paths, classes = object_photos(args.data / name)
        f, lg = served_features(image, paths, args.batch)
        h32, h8 = (
            hit_at_5(heads[k], f, lg, Vocabulary(vocab_names, getattr(pairs["vocabulary"], k)), classes)
            for k in ("fp32", "int8")
        )
        hits[name] = (h32, h8)
        rows.append((set_label(name, len(paths)), "tag hit@5", h32, h8, h32 - h8, h32 - h8 <= MAX_HIT5_DROP))

    fp32_s = sum(p.fp32_s for p in pairs.values())
    int8_s = sum(p.int8_s for p in pairs.values())
    cos = np.concatenate([(p.fp32 * p.int8).sum(1) for p in pairs.values()])  # both L2-normalised
    texts = len(cos)
    passed = all(r[5] for r in rows)
    print(f"\nint8 text quality gate: {q.file} (sha {q.sha256[:12]}) against {manifest.text_file}; ", end="")
    print(f"photos by {image.version}\n")
    print_rows(rows, ("fp32 text", "int8 text"))
    print(
        f"\nembedding cosine int8 vs fp32 over {texts} texts (captions, class names, vocabulary): "
        f"min {cos.min():.4f}, mean {cos.mean():.4f}; model time on the same batches of {args.batch}: "
        f"fp32 {fp32_s:.1f}s, int8 {int8_s:.1f}s (int8 {fp32_s / int8_s:.2f}x faster)"
    )
    print(f"gate: {'PASSED' if passed else 'FAILED'}")
    metrics = {
        "flickr8k_t2i_r10_fp32": r10["fp32"],
        "flickr8k_t2i_r10_int8": r10["int8"],
        "embedding_cosine_min": float(cos.min()),
        "embedding_cosine_mean": float(cos.mean()),
        "caption_cosine_min": float(((pairs["captions"].fp32 * pairs["captions"].int8).sum(1)).min()),
        "speedup_int8_over_fp32": fp32_s / int8_s,
        "texts": float(texts),
        "image_model_int8": 1.0 if choice.variant == "int8" else 0.0,
    }
    for name, (h32, h8) in hits.items():
        metrics[f"{name}_hit5_fp32"] = h32
        metrics[f"{name}_hit5_int8"] = h8
    if args.dry_run:
        return 0 if passed else 1
    return record_gate(args.model_dir, "text_int8", q.sha256, passed, metrics)


def _cosines(f: Features) -> Matrix:
    a, b = f.fp32[0], f.int8[0]
    cos: Matrix = ((a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-12)).astype(np.float32)
    return cos


if __name__ == "__main__":
    sys.exit(main())
