"""Caption -> tag words: tokenise, drop stop words, fold plurals (a lemmatiser-lite with no downloads)."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Sequence

WORD = re.compile(r"[a-z]+")

# Function words, auxiliaries and vague words that carry nothing a photo can show.
STOP_WORDS = frozenset(
    str.split(
        """
    a about above across after against along alongside also am among an and another any are around as at away
    back be been before behind being below beneath beside besides between both but by can could did do does
    doing down during each either else even every far few for from front further had has have having he her
    here hers him his how i if in inside into is it its itself just least less like many may me more most much
    must my near nearby next no nor not of off on one onto only or other our out outside over own part past
    per she should side so some something such than that the their them then there these they this those
    three through to too top toward towards two under underneath up upon us very via was way we were what
    when where which while who whom whose why will with within without would yet you your another one ones
    several very lot lots other others each four five six big small large little very into while almost
    """
    )
)

IRREGULAR = {
    "men": "man",
    "women": "woman",
    "children": "child",
    "people": "person",
    "persons": "person",
    "feet": "foot",
    "teeth": "tooth",
    "mice": "mouse",
    "geese": "goose",
    "oxen": "ox",
    "knives": "knife",
    "leaves": "leaf",
    "wolves": "wolf",
    "shelves": "shelf",
    "calves": "calf",
    "halves": "half",
    "lives": "life",
    "wives": "wife",
}
# Words ending in s that are not plurals (or whose singular folding would be wrong).
KEEP_S = frozenset(
    str.split(
        "bus gas glass grass dress class boss moss cross chess pass mass kiss lens canvas cactus octopus "
        "jeans pants shorts glasses sunglasses goggles stairs scissors trousers overalls clothes news "
        "species series physics gymnastics athletics tennis ss is this was has his its us yes bis"
    )
)


def lemma(word: str) -> str:
    """Fold an English plural to its singular with a few suffix rules and an irregular table."""
    if word in IRREGULAR:
        return IRREGULAR[word]
    if len(word) <= 3 or word in KEEP_S or word.endswith(("ss", "us", "is")):
        return word
    if word.endswith("ies") and len(word) > 4:
        return word[:-3] + "y"
    if word.endswith(("ches", "shes", "xes", "sses", "zes")):
        return word[:-2]
    if word.endswith("s"):
        return word[:-1]
    return word


def content_words(text: str) -> list[str]:
    """Lower-cased, alphabetic, non-stop words of length >= 3, plural-folded, in order, unique."""
    seen: dict[str, None] = {}
    for raw in WORD.findall(text.lower()):
        if len(raw) < 3 or raw in STOP_WORDS:
            continue
        w = lemma(raw)
        if w not in STOP_WORDS:
            seen.setdefault(w, None)
    return list(seen)


def text_tags(text: str, kind: str) -> list[str]:
    """The tags one text contributes: its content words if it is a caption, itself normalised if it is a tag."""
    if kind == "tags":
        tag = " ".join(WORD.findall(text.lower()))
        return [tag] if tag else []
    return content_words(text)


def image_tags(texts: Sequence[str], kind: str) -> list[str]:
    """An image's tags: the union, in order, of what each of its texts contributes."""
    words: dict[str, None] = {}
    for t in texts:
        for w in text_tags(t, kind):
            words.setdefault(w, None)
    return list(words)


def build_vocabulary(tag_lists: Iterable[Sequence[str]], min_images: int) -> list[str]:
    """Tags used by at least `min_images` images, most frequent first (ties alphabetical)."""
    counts: Counter[str] = Counter()
    for tags in tag_lists:
        counts.update(set(tags))
    return sorted((t for t, c in counts.items() if c >= min_images), key=lambda t: (-counts[t], t))
