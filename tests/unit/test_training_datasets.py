"""Dataset readers, tag extraction and vocabulary on small layouts written by the tests."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from imgsearch.training.data import select_unseen
from imgsearch.training.datasets import (
    CocoCaptionsReader,
    Flickr8kReader,
    TaggedFolderReader,
    fingerprint,
    open_dataset,
)
from imgsearch.training.text import build_vocabulary, content_words, image_tags, lemma


def test_lemma_folds_plurals_and_irregulars() -> None:
    assert lemma("dogs") == "dog"
    assert lemma("puppies") == "puppy"
    assert lemma("benches") == "bench"
    assert lemma("children") == "child"
    assert lemma("people") == "person"
    assert lemma("grass") == "grass"
    assert lemma("bus") == "bus"
    assert lemma("jeans") == "jeans"


def test_content_words_drop_stop_words_and_repeat() -> None:
    words = content_words("Two dogs are running on the grass , and the dogs play .")
    assert words == ["dog", "running", "grass", "play"]


def test_image_tags_for_captions_and_tags() -> None:
    assert image_tags(["A man rides a horse .", "Men riding horses"], "captions") == ["man", "ride", "horse", "riding"]
    assert image_tags(["Beach Party", "sun"], "tags") == ["beach party", "sun"]


def test_vocabulary_counts_images_not_mentions() -> None:
    vocab = build_vocabulary([["dog", "dog", "ball"], ["dog"], ["cat"]], min_images=2)
    assert vocab == ["dog"]
    assert build_vocabulary([["b", "a"], ["a"]], min_images=1) == ["a", "b"]


def test_select_unseen_is_deterministic_and_from_mid_frequency_nouns() -> None:
    lists = [["common", f"w{i % 30}"] for i in range(900)] + [["walking"]] * 40 + [["rare"]] * 3
    vocab = build_vocabulary(lists, 1)
    a = select_unseen(lists, vocab, 5, seed=0)
    assert a == select_unseen(lists, vocab, 5, seed=0)
    assert len(a) == 5
    # "common" (900 images) is too frequent, "rare" too rare, "walking" looks like a verb.
    assert not {"common", "rare", "walking"} & set(a)
    assert all(w.startswith("w") for w in a)


def test_flickr8k_reader(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    (tmp_path / "splits").mkdir()
    (tmp_path / "captions.csv").write_text('image,caption\na.jpg,A dog .\na.jpg,"A dog, running ."\nb.jpg,A cat .\n')
    (tmp_path / "splits" / "train.txt").write_text("a.jpg\n")
    (tmp_path / "splits" / "test.txt").write_text("b.jpg\n")
    reader = open_dataset(tmp_path)
    assert isinstance(reader, Flickr8kReader)
    samples = list(reader.samples())
    assert [(s.image.name, s.texts, s.split) for s in samples] == [
        ("a.jpg", ("A dog .", "A dog, running ."), "train"),
        ("b.jpg", ("A cat .",), "test"),
    ]
    assert samples[0].image == tmp_path / "images" / "a.jpg"


def test_coco_reader_from_root_and_file(tmp_path: Path) -> None:
    (tmp_path / "annotations").mkdir()
    for part, img_id in (("train2017", 7), ("val2017", 9)):
        (tmp_path / part).mkdir()
        ann = {
            "images": [{"id": img_id, "file_name": f"{img_id:012d}.jpg"}, {"id": 99, "file_name": "nocaption.jpg"}],
            "annotations": [
                {"image_id": img_id, "id": 1, "caption": "A bus on a street."},
                {"image_id": img_id, "id": 2, "caption": "A red bus."},
            ],
        }
        (tmp_path / "annotations" / f"captions_{part}.json").write_text(json.dumps(ann))
    reader = open_dataset(tmp_path)
    assert isinstance(reader, CocoCaptionsReader)
    samples = sorted(reader.samples(), key=lambda s: s.split)
    assert [(s.image, s.texts, s.split) for s in samples] == [
        (tmp_path / "val2017" / "000000000009.jpg", ("A bus on a street.", "A red bus."), "dev"),
        (tmp_path / "train2017" / "000000000007.jpg", ("A bus on a street.", "A red bus."), "train"),
    ]
    single = open_dataset(tmp_path / "annotations" / "captions_val2017.json")
    assert [s.image for s in single.samples()] == [tmp_path / "val2017" / "000000000009.jpg"]


def test_tagged_folder_reader(tmp_path: Path) -> None:
    (tmp_path / "tags.csv").write_text("image,tags,split\nx.png,cat; kitten|pet,train\ny.png,cup,dev\nz.png,,train\n")
    reader = open_dataset(tmp_path)
    assert isinstance(reader, TaggedFolderReader) and reader.kind == "tags"
    assert [(s.image.name, s.texts, s.split) for s in reader.samples()] == [
        ("x.png", ("cat", "kitten", "pet"), "train"),
        ("y.png", ("cup",), "dev"),
    ]
    (tmp_path / "tags.csv").write_text("image,tags,split\nx.png,cat,holdout\n")
    with pytest.raises(ValueError, match="unknown split"):
        list(open_dataset(tmp_path).samples())


def test_unknown_layout_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not a Flickr8k directory"):
        open_dataset(tmp_path)


def test_fingerprint_changes_with_the_image_list(tmp_path: Path) -> None:
    (tmp_path / "tags.csv").write_text("image,tags\nx.png,cat\ny.png,dog\n")
    samples = list(open_dataset(tmp_path).samples())
    assert fingerprint(samples) != fingerprint(samples[:1])
    assert fingerprint(samples) == fingerprint(list(samples))
