"""Served-vocabulary tagging: rank the tagger's starter vocabulary as the tagger does, on a split and on photos."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from imgsearch.tagger.core import starter_vocabulary
from imgsearch.tagger.heads import ConSEHead, Head, LearnedHead, load_head, save_head
from imgsearch.training.data import Prepared, SplitData, prepare
from imgsearch.training.features import Matrix, OnnxImageModel, OnnxTextModel, cached_text_embeddings
from imgsearch.training.metrics import tag_metrics
from imgsearch.training.text import WORD, lemma

log = logging.getLogger("imgsearch.training.tagging")

TAG_CONSE_GRID = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8)
TAG_PENALTY_GRID = (0.0, 0.25, 0.5, 0.75, 1.0)
# The tag a user adds at run time in the out-of-domain check: absent from the starter vocabulary.
UNSEEN_TAG = "feline"
# Out-of-domain photos shipped with scikit-image and the tags that count as right for each.
PHOTOS: dict[str, frozenset[str]] = {
    "chelsea.png": frozenset({"cat", "kitten", UNSEEN_TAG}),
    "coffee.png": frozenset({"coffee", "espresso", "cup", "coffee mug", "mug", "espresso machine"}),
    "rocket.jpg": frozenset({"rocket", "missile"}),
    "motorcycle_left.png": frozenset({"motorcycle", "moped", "motor scooter"}),
    "astronaut.png": frozenset({"astronaut", "spacesuit", "person", "man", "helmet"}),
}
# After plural folding (people -> person, men -> man, ...).
PERSON_WORDS = frozenset({"person", "man", "woman", "child", "boy", "girl"})
BEGIN, END = "<!-- served-tagging:begin -->", "<!-- served-tagging:end -->"


def fold(tag: str) -> str:
    """A tag's comparison key: casefolded, and plural-folded when it is a single word."""
    key = tag.casefold()
    return lemma(key) if WORD.fullmatch(key) else key


@dataclass
class Vocabulary:
    """The served starter vocabulary (plus any added tags) and its MiniLM embeddings."""

    names: list[str]
    embeddings: Matrix

    def without(self, name: str) -> Vocabulary:
        keep = [i for i, n in enumerate(self.names) if n != name]
        return Vocabulary([self.names[i] for i in keep], self.embeddings[keep])


def served_vocabulary(model_dir: Path, extra: Sequence[str] = (), progress: bool = False) -> Vocabulary:
    """`starter_vocabulary` of the model's class labels, then `extra` tags not already in it (by casefold)."""
    text_model = OnnxTextModel(model_dir)
    labels = json.loads((model_dir / text_model.manifest.labels_file).read_text())
    names = starter_vocabulary(labels)
    keys = {n.casefold() for n in names}
    names += [e for e in extra if e.casefold() not in keys]
    emb = cached_text_embeddings(text_model, names, "served-vocabulary", progress=progress)
    return Vocabulary(names, emb)


def served_truth(names: Sequence[str], image_tags: Sequence[Iterable[str]]) -> npt.NDArray[np.bool_]:
    """[images, tags]: the vocabulary entry equals one of the image's caption tags (casefold + plural folding)."""
    keys = [fold(n) for n in names]
    truth = np.zeros((len(image_tags), len(names)), dtype=bool)
    for i, tags in enumerate(image_tags):
        have = {fold(t) for t in tags}
        truth[i] = [k in have for k in keys]
    return truth


def served_scores(head: Head, features: Matrix, logits: Matrix, tags: Matrix) -> Matrix:
    """[images, tags] scores exactly as `Tagger.rank`: projected tags . tag direction + the head's tag bias."""
    projected = head.project_texts(tags)
    direction = head.tag_direction(features, logits if head.needs_logits else None)
    return (direction @ projected.T + head.tag_bias(projected)[None, :]).astype(np.float32)


def served_metrics(scores: Matrix, truth: npt.NDArray[np.bool_]) -> dict[str, float]:
    """P@5, hit@1 and MiAP (percent) over the images with at least one true entry, and how many there were."""
    m = tag_metrics(scores, truth)
    return {k: m[k] for k in ("p@5", "hit@1", "hit@3", "miap", "images") if k in m}


def split_metrics(head: Head, split: SplitData, vocab: Vocabulary) -> dict[str, float]:
    feats, logits = split.features.view("orig")
    return served_metrics(served_scores(head, feats, logits, vocab.embeddings), served_truth(vocab.names, split.tags))


@dataclass
class Photos:
    """The scikit-image photos' served features and logits (decoded exactly as the encoder decodes)."""

    names: list[str]
    features: Matrix
    logits: Matrix


def load_photos(model_dir: Path) -> Photos:
    import skimage

    root = Path(skimage.__file__).parent / "data"
    model = OnnxImageModel(model_dir)
    names = list(PHOTOS)
    feats, logits = model.run(np.stack([model.decode(root / n) for n in names]))
    return Photos(names, feats, logits)


def rank_of(order: Sequence[str], wanted: Iterable[str]) -> int:
    """1-based rank of the best-placed wanted tag in `order` (0 when none is there)."""
    want = {w.casefold() for w in wanted}
    return next((r for r, n in enumerate(order, 1) if n.casefold() in want), 0)


def photo_check(head: Head, photos: Photos, vocab: Vocabulary) -> dict[str, Any]:
    """Top tags and ranks per photo with UNSEEN_TAG in the vocabulary; `passes` is the selection gate.

    The gate: 'cat' in the cat's top 3 both without and with UNSEEN_TAG added, UNSEEN_TAG in its top 5,
    and a coffee word in the coffee photo's top 3 (without UNSEEN_TAG added it can only rank higher).
    """
    plain = vocab.without(UNSEEN_TAG)
    out: dict[str, Any] = {}
    for v, which in ((vocab, "added"), (plain, "plain")):
        scores = served_scores(head, photos.features, photos.logits, v.embeddings)
        for i, name in enumerate(photos.names):
            order = [v.names[j] for j in np.argsort(-scores[i], kind="stable")]
            if which == "added":
                best = rank_of(order, PHOTOS[name])
                out[name] = {"top5": order[:5], "best_rank": best, "hit@3": 0 < best <= 3}
            if name == "chelsea.png":
                out[name][f"cat_rank_{which}"] = rank_of(order, ["cat"])
                if which == "added":
                    out[name]["feline_rank"] = rank_of(order, [UNSEEN_TAG])
    cat, coffee = out["chelsea.png"], out["coffee.png"]
    out["passes"] = bool(
        0 < cat["cat_rank_plain"] <= 3
        and 0 < cat["cat_rank_added"] <= 3
        and 0 < cat["feline_rank"] <= 5
        and 0 < coffee["best_rank"] <= 3
    )
    return out


def person_check(head: Head, split: SplitData, vocab: Vocabulary) -> dict[str, Any]:
    """Over images whose captions mention a person word: how often a person word is among the top 5 tags."""
    idx = [i for i, tags in enumerate(split.tags) if PERSON_WORDS & {fold(t) for t in tags}]
    feats, logits = split.features.view("orig")
    scores = served_scores(head, feats[idx], logits[idx], vocab.embeddings)
    top = np.argsort(-scores, axis=1, kind="stable")[:, :5]
    person = [any(fold(vocab.names[j]) in PERSON_WORDS for j in row) for row in top]
    examples = [
        {"image": split.names[i], "top5": [vocab.names[j] for j in top[r]], "person_in_top5": person[r]}
        for r, i in enumerate(idx[:6])
    ]
    return {"images": len(idx), "person_top5": float(100.0 * np.mean(person)), "examples": examples}


@dataclass
class Setting:
    """One (tag ConSE weight, anchor penalty) point of the sweep and what it measured."""

    weight: float | None
    penalty: float
    dev: dict[str, float]
    photos: dict[str, Any]


def with_tag_setting(head: LearnedHead, conse: ConSEHead, weight: float | None, penalty: float) -> LearnedHead:
    """A copy of the head with the given tagging knobs; the ConSE head is attached so both knobs can act."""
    return dataclasses.replace(head, tag_conse_weight=weight, tag_anchor_penalty=penalty, conse=conse)


def sweep_head(
    head: LearnedHead,
    conse: ConSEHead,
    dev: SplitData,
    vocab: Vocabulary,
    photos: Photos,
    weights: Sequence[float] = TAG_CONSE_GRID,
    penalties: Sequence[float] = TAG_PENALTY_GRID,
) -> list[Setting]:
    out = []
    for w in weights:
        for p in penalties:
            h = with_tag_setting(head, conse, w, p)
            out.append(Setting(w, p, split_metrics(h, dev, vocab.without(UNSEEN_TAG)), photo_check(h, photos, vocab)))
    return out


def sweep_conse(
    conse: ConSEHead, dev: SplitData, vocab: Vocabulary, photos: Photos, penalties: Sequence[float] = TAG_PENALTY_GRID
) -> list[Setting]:
    out = []
    for p in penalties:
        h = dataclasses.replace(conse, anchor_penalty=p)
        out.append(Setting(None, p, split_metrics(h, dev, vocab.without(UNSEEN_TAG)), photo_check(h, photos, vocab)))
    return out


def choose(settings: Sequence[Setting]) -> Setting | None:
    """Best dev MiAP among the settings that pass every photo check; the first listed wins ties."""
    passing = [s for s in settings if s.photos["passes"]]
    return max(passing, key=lambda s: s.dev["miap"]) if passing else None


def choose_tag_setting(
    head_path: Path, data: Prepared, dev: SplitData, model_dir: Path, weight: float = -1.0, penalty: float = -1.0
) -> tuple[float | None, float, dict[str, Any]]:
    """The head's (tag_conse_weight, tag_anchor_penalty): given values (>= 0) or chosen on dev by `choose`.

    When no setting passes the photo checks the head keeps tag_conse_weight None (= conse_weight) and no
    penalty, and the report says so.
    """
    conse = data.conse()
    head = load_head(head_path, image_model=data.image_model, feature_dim=1280, text_dim=384, conse=conse)
    vocab = served_vocabulary(model_dir, [UNSEEN_TAG])
    photos = load_photos(model_dir)
    settings = sweep_head(
        head,
        conse,
        dev,
        vocab,
        photos,
        TAG_CONSE_GRID if weight < 0 else (weight,),
        TAG_PENALTY_GRID if penalty < 0 else (penalty,),
    )
    report = {"grid": [setting_row(s) for s in settings]}
    if weight >= 0 and penalty >= 0:
        return weight, penalty, report
    best = choose(settings)
    if best is None:
        log.warning("no tag setting passes the photo checks; keeping the head's search blend for tags")
        return None, 0.0, report
    return best.weight, best.penalty, report


def setting_row(s: Setting) -> dict[str, Any]:
    cat, coffee = s.photos["chelsea.png"], s.photos["coffee.png"]
    return {
        "tag_conse_weight": s.weight,
        "anchor_penalty": s.penalty,
        **{f"dev_{k}": round(v, 2) for k, v in s.dev.items()},
        "cat_rank": cat["cat_rank_plain"],
        "cat_rank_with_feline": cat["cat_rank_added"],
        "feline_rank": cat["feline_rank"],
        "coffee_rank": coffee["best_rank"],
        "passes": s.photos["passes"],
    }


def fmt_rank(r: int) -> str:
    return str(r) if r else ">all"


def grid_table(rows: Sequence[dict[str, Any]], what: str) -> str:
    lines = [
        f"| {what} | Anchor penalty | P@5 | hit@1 | MiAP | 'cat' rank | 'feline' rank | coffee rank | Passes |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        w = "ConSE" if r["tag_conse_weight"] is None else f"{r['tag_conse_weight']:.1f}"
        lines.append(
            f"| {w} | {r['anchor_penalty']:.2f} | {r['dev_p@5']:.1f} | {r['dev_hit@1']:.1f} | {r['dev_miap']:.1f} | "
            f"{r['cat_rank']} ({r['cat_rank_with_feline']}) | {fmt_rank(r['feline_rank'])} | "
            f"{fmt_rank(r['coffee_rank'])} | {'yes' if r['passes'] else 'no'} |"
        )
    return "\n".join(lines)


def test_table(results: dict[str, dict[str, Any]]) -> str:
    lines = [
        "| Tagger | P@5 | hit@1 | MiAP | Person word in top 5 | "
        + " | ".join(f"{n} hit@3 (rank)" for n in PHOTOS)
        + " | 'feline' rank |",
        "|---|---:|---:|---:|---:|" + "---:|" * (len(PHOTOS) + 1),
    ]
    for label, r in results.items():
        t, photos = r["test"], r["photos"]
        cells = [f"{'yes' if photos[n]['hit@3'] else 'no'} ({fmt_rank(photos[n]['best_rank'])})" for n in PHOTOS]
        lines.append(
            f"| {label} | {t['p@5']:.1f} | {t['hit@1']:.1f} | {t['miap']:.1f} | {r['person']['person_top5']:.1f} | "
            + " | ".join(cells)
            + f" | {fmt_rank(photos['chelsea.png']['feline_rank'])} |"
        )
    return "\n".join(lines)


def markdown(report: dict[str, Any]) -> str:
    chosen = report["chosen"]
    ex = report["results"][report["chosen_label"]]["person"]["examples"]
    examples = "\n".join(
        f"| {e['image']} | {', '.join(e['top5'])} | {'yes' if e['person_in_top5'] else 'no'} |" for e in ex
    )
    photos = report["results"][report["chosen_label"]]["photos"]
    photo_rows = "\n".join(f"| {n} | {', '.join(photos[n]['top5'])} |" for n in PHOTOS)
    return f"""{BEGIN}

## Tagging with the served vocabulary

The tag columns above rank Flickr8k caption words. The tagger serves another vocabulary: the
{report["vocabulary_size"]} entries of `starter_vocabulary` (ImageNet class names + `everyday_words.txt`).
Here each Flickr8k image ranks that vocabulary exactly as `Tagger.rank` does (`head.tag_direction`,
projected tag embeddings through the served MiniLM ONNX model, plus `head.tag_bias`); the true entries of
an image are those whose casefolded, plural-folded text equals one of its caption tags
(`imgsearch.training.tagging`). Only images with at least one true entry count
({report["dev_images"]} dev, {report["test_images"]} test). Out of domain, five scikit-image photos are
tagged with `{UNSEEN_TAG}` added to the vocabulary as an unseen tag; right tags: cat (chelsea.png):
cat/kitten/feline; coffee.png: coffee/espresso/cup/coffee mug/mug/espresso machine; rocket.jpg:
rocket/missile; motorcycle_left.png: motorcycle/moped/motor scooter; astronaut.png:
astronaut/spacesuit/person/man/helmet. A setting passes when 'cat' is in the cat's top 3 (without and
with `{UNSEEN_TAG}` added), `{UNSEEN_TAG}` is in its top 5 and a coffee word is in coffee.png's top 3.

Reproduce: `{report["command"]}`

### Dev sweep (Flickr8k dev)

`{report["head"]}` with `tag_conse_weight` x `tag_anchor_penalty` (its search blend `conse_weight` stays
{report["conse_weight"]:.2f}), and ConSE alone with its `anchor_penalty` (the tagger's
`IMGSEARCH_TAGGER_ANCHOR_PENALTY`). Ranks: 'cat' without (with) `{UNSEEN_TAG}` added.

{grid_table(report["grid"], "Tag ConSE weight")}

{grid_table(report["conse_grid"], "Head")}

**Chosen** (best dev MiAP among the passing settings): `tag_conse_weight` {chosen["tag_conse_weight"]},
`tag_anchor_penalty` {chosen["tag_anchor_penalty"]}; written to `{report["head"]}`'s manifest. Best ConSE
`anchor_penalty` by the same rule: {report["conse_chosen_penalty"]}.

### Test (Flickr8k test)

"Person word in top 5": over the {report["person_images"]} test images whose captions mention
person/people/man/woman/child/boy/girl, the percentage whose top 5 tags contain one of those words.

{test_table(report["results"])}

Top 5 tags of the chosen setting on the scikit-image photos (`{UNSEEN_TAG}` added):

| Photo | Top 5 |
|---|---|
{photo_rows}

Top 5 tags of the chosen setting on the first test images whose captions mention a person:

| Image | Top 5 | Person word |
|---|---|---|
{examples}

{END}"""


def write_section(path: Path, block: str) -> None:
    """Replace the served-tagging section of the document, or append it."""
    text = path.read_text(encoding="utf-8") if path.exists() else "# Evaluation\n"
    if BEGIN in text and END in text:
        text = text[: text.index(BEGIN)] + block + text[text.index(END) + len(END) :]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text, encoding="utf-8")


def tag_manifest(
    manifest: dict[str, Any], weight: float | None, penalty: float, grid: Sequence[dict[str, Any]]
) -> dict[str, Any]:
    """The manifest with the tag knobs, the dev sweep and the chosen point's dev metrics (`dev_served_*`)."""
    row = next((r for r in grid if r["tag_conse_weight"] == weight and r["anchor_penalty"] == penalty), {})
    served = {f"dev_served_{k[4:]}": v for k, v in row.items() if k.startswith("dev_") and k != "dev_images"}
    return {
        **manifest,
        "tag_conse_weight": weight,
        "tag_anchor_penalty": penalty,
        "tag_sweep_dev": list(grid),
        "metrics": {**manifest.get("metrics", {}), **served},
    }


def update_head(path: Path, weight: float | None, penalty: float, grid: Sequence[dict[str, Any]]) -> None:
    """Re-save a head file with the tag knobs and their dev sweep added; every array and other key is kept."""
    with np.load(path, allow_pickle=False) as data:
        arrays = {k: np.asarray(data[k]) for k in data.files if k != "manifest"}
        manifest: dict[str, Any] = json.loads(bytes(data["manifest"]).decode("utf-8"))
    save_head(path, tag_manifest(manifest, weight, penalty, grid), arrays)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", type=Path, required=True, help="Flickr8k directory (captions + splits)")
    parser.add_argument("--model-dir", type=Path, default=Path("models"), help="exported ONNX models")
    parser.add_argument("--head", type=Path, default=Path("heads/default.npz"), help="head file to tune")
    parser.add_argument("--json", type=Path, help="add the report under the key `served_tagging` of this JSON")
    parser.add_argument("--markdown", type=Path, help="write the section between its markers in this document")
    parser.add_argument("--write-head", action="store_true", help="store the chosen setting in the head file")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    data = prepare(args.data, args.model_dir, progress=False)
    conse = data.conse()
    head = load_head(args.head, image_model=data.image_model, feature_dim=1280, text_dim=384, conse=conse)
    vocab = served_vocabulary(args.model_dir, [UNSEEN_TAG])
    plain = vocab.without(UNSEEN_TAG)
    photos = load_photos(args.model_dir)
    dev, test = data.splits["dev"], data.splits["test"]

    settings = sweep_head(head, conse, dev, vocab, photos)
    grid = [setting_row(s) for s in settings]
    conse_settings = sweep_conse(conse, dev, vocab, photos)
    conse_grid = [setting_row(s) for s in conse_settings]
    best = choose(settings)
    weight, penalty = (best.weight, best.penalty) if best else (None, 0.0)
    best_conse = choose(conse_settings)
    conse_penalty = best_conse.penalty if best_conse else conse.anchor_penalty

    candidates: dict[str, Head] = {
        f"ConSE, anchor penalty {conse.anchor_penalty:.2f} (served default)": conse,
        f"{args.head.stem}, untouched (tag blend = conse_weight {head.conse_weight:.2f}, no penalty)": (
            with_tag_setting(head, conse, None, 0.0)
        ),
        f"{args.head.stem}, chosen (tag blend {weight}, penalty {penalty})": with_tag_setting(
            head, conse, weight, penalty
        ),
    }
    if conse_penalty != conse.anchor_penalty:
        candidates[f"ConSE, anchor penalty {conse_penalty:.2f}"] = dataclasses.replace(
            conse, anchor_penalty=conse_penalty
        )
    results = {
        label: {
            "test": split_metrics(h, test, plain),
            "photos": photo_check(h, photos, vocab),
            "person": person_check(h, test, plain),
        }
        for label, h in candidates.items()
    }
    chosen_label = list(candidates)[2]
    command = "python -m imgsearch.training.tagging " + " ".join(sys.argv[1:] if argv is None else argv)
    report: dict[str, Any] = {
        "command": command,
        "head": str(args.head),
        "conse_weight": head.conse_weight,
        "vocabulary_size": len(plain.names),
        "dev_images": int(grid[0]["dev_images"]),
        "test_images": int(results[chosen_label]["test"]["images"]),
        "person_images": results[chosen_label]["person"]["images"],
        "grid": grid,
        "conse_grid": conse_grid,
        "chosen": {"tag_conse_weight": weight, "tag_anchor_penalty": penalty},
        "conse_chosen_penalty": conse_penalty,
        "chosen_label": chosen_label,
        "results": results,
    }
    print(grid_table(grid, "Tag ConSE weight"))
    print(grid_table(conse_grid, "Head"))
    print(test_table(results))
    print(json.dumps({k: v["photos"] for k, v in results.items()}, indent=1))
    print(json.dumps(results[chosen_label]["person"], indent=1))
    if args.markdown:
        write_section(args.markdown, markdown(report))
    if args.json:
        payload = json.loads(args.json.read_text()) if args.json.exists() else {}
        payload["served_tagging"] = report
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
    if args.write_head and best is not None:
        update_head(args.head, weight, penalty, grid)
    return 0


if __name__ == "__main__":
    sys.exit(main())
