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

from imgsearch.heads import ConSEHead, Head, LearnedHead, TagGate, l2_normalise, load_head, save_head
from imgsearch.tagger.core import starter_vocabulary
from imgsearch.training.data import Prepared, SplitData, prepare
from imgsearch.training.features import Matrix, OnnxImageModel, OnnxTextModel, cached_text_embeddings
from imgsearch.training.metrics import tag_metrics
from imgsearch.training.text import WORD, lemma

log = logging.getLogger("imgsearch.training.tagging")

TAG_CONSE_GRID = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8)
TAG_PENALTY_GRID = (0.0, 0.25, 0.5, 0.75, 1.0)
# The in-domain gate (TagGate): k nearest bank captions, the (low, high) ramp of the in-domain score, the
# ConSE weight out of domain (score <= low) and in domain (score >= high), and the anchor penalty.
GATE_K = 10
GATE_RAMPS = ((0.30, 0.34), (0.32, 0.35), (0.33, 0.36), (0.34, 0.38))
GATE_WEIGHT_OUT = (0.5, 0.6)
GATE_WEIGHT_IN = (0.1, 0.2, 0.3, 0.4)
GATE_PENALTY_GRID = (0.5, 0.75)
# The gate's bank: at most this many training captions, one per image, drawn with this seed.
GATE_BANK_SIZE = 2000
GATE_BANK_SEED = 0
GATE_BANK_ARRAY = "tag_gate_bank"
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


@dataclass(frozen=True)
class GateSpec:
    """The knobs of a TagGate (its bank aside), as stored under the manifest key `tag_gate`."""

    k: int
    low: float
    high: float
    weight_out: float
    weight_in: float

    def gate(self, bank: npt.NDArray[np.floating[Any]]) -> TagGate:
        """The gate over `bank`, L2-normalised in float32 as `load_head` does."""
        unit = l2_normalise(bank.astype(np.float32))
        return TagGate(unit, self.k, self.low, self.high, self.weight_out, self.weight_in)

    def manifest(self) -> dict[str, Any]:
        return {"bank": GATE_BANK_ARRAY, **dataclasses.asdict(self)}


@dataclass
class Setting:
    """One point of the sweep (fixed tag ConSE weight, or an in-domain gate, and an anchor penalty) and its results."""

    weight: float | None
    penalty: float
    dev: dict[str, float]
    photos: dict[str, Any]
    gate: GateSpec | None = None


def gate_bank(
    head: Head,
    split: SplitData,
    image_texts: Sequence[Sequence[int]] | None = None,
    size: int = GATE_BANK_SIZE,
    seed: int = GATE_BANK_SEED,
) -> npt.NDArray[np.float16]:
    """The TagGate bank: one caption each of up to `size` random training images (fixed seed), as float16.

    The captions' MiniLM embeddings are the split's (the served ONNX text model, `cached_text_embeddings`),
    projected with `head.project_texts`. `image_texts` restricts the captions each image may give (e.g.
    without held-out tags); by default every caption of the image counts.
    """
    texts = [list(t) for t in (split.image_texts() if image_texts is None else image_texts)]
    candidates = [i for i, t in enumerate(texts) if t]
    rng = np.random.default_rng(seed)
    picked = sorted(int(i) for i in rng.choice(len(candidates), size=min(size, len(candidates)), replace=False))
    rows = [texts[candidates[i]][int(rng.integers(len(texts[candidates[i]])))] for i in picked]
    return head.project_texts(split.text_embeddings[rows]).astype(np.float16)


def with_tag_setting(
    head: LearnedHead,
    conse: ConSEHead,
    weight: float | None,
    penalty: float,
    gate: TagGate | None = None,
) -> LearnedHead:
    """A copy of the head with the given tagging knobs; the ConSE head is attached so every knob can act."""
    return dataclasses.replace(head, tag_conse_weight=weight, tag_anchor_penalty=penalty, conse=conse, tag_gate=gate)


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


def gate_grid() -> list[tuple[GateSpec, float]]:
    """Every (gate, anchor penalty) of the gated sweep."""
    return [
        (GateSpec(GATE_K, low, high, w_out, w_in), p)
        for low, high in GATE_RAMPS
        for w_out in GATE_WEIGHT_OUT
        for w_in in GATE_WEIGHT_IN
        for p in GATE_PENALTY_GRID
    ]


def sweep_gated(
    head: LearnedHead,
    conse: ConSEHead,
    dev: SplitData,
    vocab: Vocabulary,
    photos: Photos,
    bank: Matrix,
    grid: Sequence[tuple[GateSpec, float]] | None = None,
) -> list[Setting]:
    out = []
    for spec, p in gate_grid() if grid is None else grid:
        h = with_tag_setting(head, conse, None, p, spec.gate(bank))
        dev_m = split_metrics(h, dev, vocab.without(UNSEEN_TAG))
        out.append(Setting(None, p, dev_m, photo_check(h, photos, vocab), spec))
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


@dataclass
class TagChoice:
    """The tag knobs to store in a head: a fixed weight or a gate (with its bank), the penalty, the dev sweep."""

    weight: float | None
    penalty: float
    gate: GateSpec | None
    bank: npt.NDArray[np.float16] | None
    grid: list[dict[str, Any]]


def choose_tag_setting(
    head_path: Path,
    data: Prepared,
    dev: SplitData,
    model_dir: Path,
    weight: float = -1.0,
    penalty: float = -1.0,
    image_texts: Sequence[Sequence[int]] | None = None,
) -> TagChoice:
    """The head's tag knobs: the given fixed values (both >= 0), or chosen on dev by `choose`.

    When either value is < 0 the fixed grid (restricted to the given value, if any) and the gated grid
    (restricted to the given penalty, if any) are swept and the best passing setting wins. When none
    passes, the head keeps tag_conse_weight None (= conse_weight), no penalty and no gate. `image_texts`
    goes to `gate_bank` (training captions the bank may use).
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
    if weight >= 0 and penalty >= 0:
        return TagChoice(weight, penalty, None, None, [setting_row(s) for s in settings])
    bank = gate_bank(head, data.splits["train"], image_texts)
    gated_grid = [(g, p) for g, p in gate_grid() if penalty < 0 or p == penalty]
    settings += sweep_gated(head, conse, dev, vocab, photos, bank.astype(np.float32), gated_grid)
    grid = [setting_row(s) for s in settings]
    best = choose(settings)
    if best is None:
        log.warning("no tag setting passes the photo checks; keeping the head's search blend for tags")
        return TagChoice(None, 0.0, None, None, grid)
    return TagChoice(best.weight, best.penalty, best.gate, bank if best.gate else None, grid)


def setting_row(s: Setting) -> dict[str, Any]:
    cat, coffee = s.photos["chelsea.png"], s.photos["coffee.png"]
    return {
        "tag_conse_weight": s.weight,
        "tag_gate": None if s.gate is None else dataclasses.asdict(s.gate),
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


def gate_label(gate: dict[str, Any]) -> str:
    return f"{gate['low']:.2f}-{gate['high']:.2f}, {gate['weight_out']:.1f} -> {gate['weight_in']:.1f}"


def gated_rows(rows: Sequence[dict[str, Any]], passing: int = 10, failing: int = 4) -> list[dict[str, Any]]:
    """The gated rows worth a table: the `passing` best passing ones by dev MiAP, then the `failing` best failing."""
    gated = sorted((r for r in rows if r["tag_gate"] is not None), key=lambda r: -r["dev_miap"])
    return [r for r in gated if r["passes"]][:passing] + [r for r in gated if not r["passes"]][:failing]


def gated_table(rows: Sequence[dict[str, Any]]) -> str:
    lines = [
        "| Ramp low-high, ConSE weight out -> in | Anchor penalty | P@5 | hit@1 | MiAP | 'cat' rank | 'feline' rank "
        "| coffee rank | Passes |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        lines.append(
            f"| {gate_label(r['tag_gate'])} | {r['anchor_penalty']:.2f} | {r['dev_p@5']:.1f} | {r['dev_hit@1']:.1f} | "
            f"{r['dev_miap']:.1f} | {r['cat_rank']} ({r['cat_rank_with_feline']}) | {fmt_rank(r['feline_rank'])} | "
            f"{fmt_rank(r['coffee_rank'])} | {'yes' if r['passes'] else 'no'} |"
        )
    return "\n".join(lines)


def setting_text(weight: float | None, penalty: float, gate: GateSpec | None) -> str:
    if gate is not None:
        return (
            f"gate k {gate.k}, ramp {gate.low:.2f}-{gate.high:.2f}, ConSE weight {gate.weight_out:.1f} -> "
            f"{gate.weight_in:.1f}, penalty {penalty}"
        )
    return f"tag blend {weight}, penalty {penalty}"


def gate_summary(head: LearnedHead, photos: Photos, split: SplitData) -> dict[str, Any]:
    """In-domain scores and tag ConSE weights of the head's gate on the photos and on the split's person images."""
    if head.tag_gate is None:
        return {}
    gate = head.tag_gate
    alone = dataclasses.replace(head, tag_gate=None, tag_conse_weight=0.0, conse_weight=0.0, conse=None)

    def learned(features: Matrix) -> Matrix:
        return alone.tag_direction(features, None)

    idx = [i for i, tags in enumerate(split.tags) if PERSON_WORDS & {fold(t) for t in tags}]
    feats = split.features.view("orig")[0]
    people, every = learned(feats[idx]), learned(feats)
    out: dict[str, Any] = {
        "photos": {
            n: {"score": round(float(sc), 3), "weight": round(float(w), 3)}
            for n, sc, w in zip(
                photos.names,
                gate.scores(learned(photos.features)),
                gate.weights(learned(photos.features)),
                strict=True,
            )
        }
    }
    for what, x in (("person_images", people), ("all_images", every)):
        sc, w = gate.scores(x), gate.weights(x)
        out[what] = {
            "score_p10_median_p90": [round(float(v), 3) for v in np.percentile(sc, [10, 50, 90])],
            "mean_weight": round(float(w.mean()), 3),
            "share_at_weight_in": round(float(100.0 * np.mean(np.isclose(w, gate.weight_in))), 1),
            "share_at_weight_out": round(float(100.0 * np.mean(np.isclose(w, gate.weight_out))), 1),
        }
    return out


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

{grid_table([r for r in report["grid"] if r["tag_gate"] is None], "Tag ConSE weight")}

{grid_table(report["conse_grid"], "Head")}

Gated settings (`TagGate`, k = {GATE_K}, bank: {report["gate_bank_size"]} training captions, one per image,
seed {GATE_BANK_SEED}, projected with the head's text adapter): the tag ConSE weight ramps per image from
"out" (in-domain score <= low) to "in" (score >= high), the score being the mean cosine of the learned
direction to its {GATE_K} nearest bank captions. {gated_count_text(report["grid"])}

{gated_table(gated_rows(report["grid"]))}

**Chosen** (best dev MiAP among all passing settings, fixed and gated): {chosen_text(chosen)}; written to
`{report["head"]}`. Best fixed setting by the same rule: {report["fixed_chosen"]}. Best ConSE
`anchor_penalty` by the same rule: {report["conse_chosen_penalty"]}.
{gate_text(report["results"][report["chosen_label"]].get("gate", {}))}
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


def gated_count_text(grid: Sequence[dict[str, Any]]) -> str:
    gated = [r for r in grid if r["tag_gate"] is not None]
    passing = sum(r["passes"] for r in gated)
    return (
        f"{len(gated)} settings, {passing} pass; shown: the 10 best passing by dev MiAP, then the 4 best failing "
        "(every row is in `served_tagging.grid` of docs/evaluation.json)."
    )


def chosen_text(chosen: dict[str, Any]) -> str:
    gate = chosen.get("tag_gate")
    if gate is None:
        return f"`tag_conse_weight` {chosen['tag_conse_weight']}, `tag_anchor_penalty` {chosen['tag_anchor_penalty']}"
    return (
        f"`tag_gate` k {gate['k']}, low {gate['low']}, high {gate['high']}, weight_out {gate['weight_out']}, "
        f"weight_in {gate['weight_in']}, `tag_anchor_penalty` {chosen['tag_anchor_penalty']}"
    )


def gate_text(summary: dict[str, Any]) -> str:
    if not summary:
        return ""
    photos = ", ".join(f"{n} {v['score']:.3f} (weight {v['weight']:.2f})" for n, v in summary["photos"].items())
    people, every = summary["person_images"], summary["all_images"]
    p10, med, p90 = people["score_p10_median_p90"]
    return (
        f"\nIn-domain scores of the chosen gate (tag ConSE weight in brackets): {photos}. Test images whose "
        f"captions mention a person: p10 / median / p90 {p10:.3f} / {med:.3f} / {p90:.3f}, mean weight "
        f"{people['mean_weight']:.2f} ({people['share_at_weight_in']:.1f} % at the in-domain weight); all test "
        f"images with a true entry: mean weight {every['mean_weight']:.2f}.\n"
    )


def write_section(path: Path, block: str) -> None:
    """Replace the served-tagging section of the document, or append it."""
    text = path.read_text(encoding="utf-8") if path.exists() else "# Evaluation\n"
    if BEGIN in text and END in text:
        text = text[: text.index(BEGIN)] + block + text[text.index(END) + len(END) :]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text, encoding="utf-8")


def tag_manifest(manifest: dict[str, Any], choice: TagChoice) -> dict[str, Any]:
    """The manifest with the tag knobs, the dev sweep and the chosen point's dev metrics (`dev_served_*`).

    A gate replaces the fixed weight (`tag_conse_weight` None, `tag_gate` set); a fixed setting drops any gate.
    """
    gate = None if choice.gate is None else dataclasses.asdict(choice.gate)
    row = next(
        (
            r
            for r in choice.grid
            if (r["tag_conse_weight"], r["anchor_penalty"], r["tag_gate"]) == (choice.weight, choice.penalty, gate)
        ),
        {},
    )
    served = {f"dev_served_{k[4:]}": v for k, v in row.items() if k.startswith("dev_") and k != "dev_images"}
    out = {
        **manifest,
        "tag_conse_weight": choice.weight,
        "tag_anchor_penalty": choice.penalty,
        "tag_sweep_dev": list(choice.grid),
        "metrics": {**manifest.get("metrics", {}), **served},
    }
    out.pop("tag_gate", None)
    if choice.gate is not None:
        out["tag_gate"] = choice.gate.manifest()
    return out


def tag_arrays(arrays: dict[str, Any], choice: TagChoice) -> dict[str, Any]:
    """The head's arrays with the gate's bank stored (a gate) or removed (a fixed setting)."""
    out = {k: v for k, v in arrays.items() if k != GATE_BANK_ARRAY}
    if choice.gate is not None and choice.bank is not None:
        out[GATE_BANK_ARRAY] = choice.bank.astype(np.float16)
    return out


def update_head(path: Path, choice: TagChoice) -> None:
    """Re-save a head file with the tag knobs (and gate bank) and their dev sweep; every other array and key is kept."""
    with np.load(path, allow_pickle=False) as data:
        arrays = {k: np.asarray(data[k]) for k in data.files if k != "manifest"}
        manifest: dict[str, Any] = json.loads(bytes(data["manifest"]).decode("utf-8"))
    save_head(path, tag_manifest(manifest, choice), tag_arrays(arrays, choice))


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
    bank = gate_bank(head, data.splits["train"])
    gated = sweep_gated(head, conse, dev, vocab, photos, bank.astype(np.float32))
    grid = [setting_row(s) for s in settings + gated]
    conse_settings = sweep_conse(conse, dev, vocab, photos)
    conse_grid = [setting_row(s) for s in conse_settings]
    best = choose(settings + gated)
    choice = (
        TagChoice(best.weight, best.penalty, best.gate, bank if best.gate else None, grid)
        if best
        else TagChoice(None, 0.0, None, None, grid)
    )
    best_fixed = choose(settings)
    fixed_weight, fixed_penalty = (best_fixed.weight, best_fixed.penalty) if best_fixed else (None, 0.0)
    best_conse = choose(conse_settings)
    conse_penalty = best_conse.penalty if best_conse else conse.anchor_penalty
    chosen_gate = None if choice.gate is None else choice.gate.gate(bank)

    chosen_label = f"{args.head.stem}, chosen ({setting_text(choice.weight, choice.penalty, choice.gate)})"
    candidates: dict[str, Head] = {
        f"ConSE, anchor penalty {conse.anchor_penalty:.2f} (served default)": conse,
        f"{args.head.stem}, untouched (tag blend = conse_weight {head.conse_weight:.2f}, no penalty)": (
            with_tag_setting(head, conse, None, 0.0)
        ),
        f"{args.head.stem}, best fixed ({setting_text(fixed_weight, fixed_penalty, None)})": with_tag_setting(
            head, conse, fixed_weight, fixed_penalty
        ),
        chosen_label: with_tag_setting(head, conse, choice.weight, choice.penalty, chosen_gate),
    }
    if conse_penalty != conse.anchor_penalty:
        candidates[f"ConSE, anchor penalty {conse_penalty:.2f}"] = dataclasses.replace(
            conse, anchor_penalty=conse_penalty
        )
    results: dict[str, dict[str, Any]] = {
        label: {
            "test": split_metrics(h, test, plain),
            "photos": photo_check(h, photos, vocab),
            "person": person_check(h, test, plain),
        }
        for label, h in candidates.items()
    }
    chosen_head = candidates[chosen_label]
    if isinstance(chosen_head, LearnedHead) and chosen_head.tag_gate is not None:
        results[chosen_label]["gate"] = gate_summary(chosen_head, photos, test)
    command = "python -m imgsearch.training.tagging " + " ".join(sys.argv[1:] if argv is None else argv)
    report: dict[str, Any] = {
        "command": command,
        "head": str(args.head),
        "conse_weight": head.conse_weight,
        "vocabulary_size": len(plain.names),
        "dev_images": int(grid[0]["dev_images"]),
        "test_images": int(results[chosen_label]["test"]["images"]),
        "person_images": results[chosen_label]["person"]["images"],
        "gate_bank_size": int(bank.shape[0]),
        "grid": grid,
        "conse_grid": conse_grid,
        "chosen": {
            "tag_conse_weight": choice.weight,
            "tag_anchor_penalty": choice.penalty,
            "tag_gate": None if choice.gate is None else dataclasses.asdict(choice.gate),
        },
        "fixed_chosen": setting_text(fixed_weight, fixed_penalty, None),
        "conse_chosen_penalty": conse_penalty,
        "chosen_label": chosen_label,
        "results": results,
    }
    print(grid_table([r for r in grid if r["tag_gate"] is None], "Tag ConSE weight"))
    print(grid_table(conse_grid, "Head"))
    print(gated_table(gated_rows(grid)))
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
        update_head(args.head, choice)
    return 0


if __name__ == "__main__":
    sys.exit(main())
