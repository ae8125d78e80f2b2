"""Train every head the evaluation table compares (ablations under the zero-shot protocol, shipped heads)."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from pathlib import Path

from imgsearch.training.data import prepare
from imgsearch.training.features import CACHE_DIR
from imgsearch.training.train import TrainConfig, train_and_export

# The recipe of the served default (also train.py's defaults); the ablations below change one thing each.
RECIPE = TrainConfig()
INFONCE = dataclasses.replace(RECIPE, loss="infonce", tag_weight=1.0)
BASELINE = dataclasses.replace(
    INFONCE, text_adapter=False, dropout=0.0, weight_decay=1e-4, flip_augment=False, epochs=40, conse_weight=0.0
)

# Ablations: every unseen tag is held out of training, so all of them can be scored on unseen tags.
ABLATIONS: dict[str, TrainConfig] = {
    "zs-linear-infonce-plain": BASELINE,
    "zs-linear-infonce": dataclasses.replace(INFONCE, text_adapter=False, conse_weight=0.0),
    "zs-linear-infonce-adapter": dataclasses.replace(INFONCE, conse_weight=0.0),
    "zs-linear-infonce-adapter-conse": INFONCE,
    "zs-linear-vse-adapter": dataclasses.replace(INFONCE, loss="vse", conse_weight=0.0),
    "zs-linear-cosine": dataclasses.replace(INFONCE, loss="cosine", text_adapter=False, conse_weight=0.0),
    "zs-linear-fast0tag": dataclasses.replace(INFONCE, loss="fast0tag", text_adapter=False, conse_weight=0.0),
    "zs-linear-infonce-fast0tag-adapter": dataclasses.replace(RECIPE, conse_weight=0.0),
    "zs-linear-infonce-bow-adapter": dataclasses.replace(INFONCE, target="bow", conse_weight=0.0),
    "zs-mlp-infonce-adapter": dataclasses.replace(INFONCE, kind="mlp", dropout=0.3, conse_weight=0.0),
    "zs-default": RECIPE,
}
# Shipped heads, trained on every tag (no hold-out): committed under heads/.
SHIPPED: dict[str, TrainConfig] = {
    "default": RECIPE,
    "linear-infonce": dataclasses.replace(INFONCE, text_adapter=False, conse_weight=0.0),
    # Bag-of-words targets: a head for tagging, not for search (docs/evaluation.md).
    "tags-bow": dataclasses.replace(INFONCE, target="bow", conse_weight=0.0),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", type=Path, required=True, help="Flickr8k directory")
    parser.add_argument("--model-dir", type=Path, default=Path("models"))
    parser.add_argument("--heads", type=Path, default=Path("heads"), help="where the shipped heads go")
    parser.add_argument("--runs", type=Path, default=CACHE_DIR / "runs", help="where the ablation heads go")
    parser.add_argument(
        "--larger-model-dir",
        type=Path,
        help="also train the recipe on another EfficientNet-Lite export (e.g. training/cache/models-lite1)",
    )
    parser.add_argument("--only", nargs="*", help="train only these names")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    data = prepare(args.data, args.model_dir, progress=not args.quiet)
    jobs = [(args.runs / f"{n}.npz", dataclasses.replace(c, name=n, holdout=True)) for n, c in ABLATIONS.items()]
    jobs += [(args.heads / f"{n}.npz", dataclasses.replace(c, name=n, holdout=False)) for n, c in SHIPPED.items()]
    for out, cfg in jobs:
        if args.only and cfg.name not in args.only:
            continue
        m = train_and_export(data, cfg, out, args.model_dir, progress=not args.quiet)
        print(f"{out}: epoch {m['best_epoch']}, blend {m['conse_weight']:.2f}, dev {m['metrics']}", flush=True)
    if args.larger_model_dir and (not args.only or "zs-default-larger" in args.only):
        larger = prepare(args.data, args.larger_model_dir, progress=not args.quiet)
        cfg = dataclasses.replace(RECIPE, name="zs-default-larger", holdout=True)
        out = args.runs / f"zs-default-{larger.image_model.split('@')[0]}.npz"
        m = train_and_export(larger, cfg, out, args.larger_model_dir, progress=not args.quiet)
        print(f"{out}: epoch {m['best_epoch']}, blend {m['conse_weight']:.2f}, dev {m['metrics']}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
