"""Dataset readers (Flickr8k, COCO captions, folder + tag CSV) behind one interface."""

from __future__ import annotations

import csv
import hashlib
import json
import re
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

SPLITS = ("train", "dev", "test")
# Tag lists in a CSV may use any of these separators; commas too when the cell is quoted.
TAG_SEPARATORS = re.compile(r"[;|,]")


@dataclass(frozen=True)
class Sample:
    """One image with its texts: captions (kind "captions") or tags (kind "tags")."""

    image: Path
    texts: tuple[str, ...]
    split: str


class DatasetReader(Protocol):
    """Anything that yields samples; `kind` says whether texts are captions or tags."""

    @property
    def name(self) -> str: ...

    @property
    def kind(self) -> str: ...

    def samples(self) -> Iterator[Sample]: ...


@dataclass(frozen=True)
class Flickr8kReader:
    """Flickr8k layout: images/, captions.csv (image,caption) and splits/{train,dev,test}.txt."""

    root: Path
    name: str = "flickr8k"
    kind: str = "captions"

    def samples(self) -> Iterator[Sample]:
        captions: dict[str, list[str]] = defaultdict(list)
        with (self.root / "captions.csv").open(newline="", encoding="utf-8") as fh:
            for row in csv.DictReader(fh):
                captions[row["image"]].append(row["caption"].strip())
        for split in SPLITS:
            path = self.root / "splits" / f"{split}.txt"
            if not path.exists():
                continue
            for line in path.read_text(encoding="utf-8").splitlines():
                name = line.strip()
                if name and captions.get(name):
                    yield Sample(self.root / "images" / name, tuple(captions[name]), split)


@dataclass(frozen=True)
class CocoCaptionsReader:
    """COCO captions JSON files (images[] and annotations[] with image_id/caption), one per split."""

    annotations: dict[str, Path]
    image_dirs: dict[str, Path]
    name: str = "coco"
    kind: str = "captions"

    def samples(self) -> Iterator[Sample]:
        for split, path in self.annotations.items():
            data = json.loads(path.read_text(encoding="utf-8"))
            captions: dict[int, list[str]] = defaultdict(list)
            for ann in data["annotations"]:
                captions[int(ann["image_id"])].append(str(ann["caption"]).strip())
            for image in sorted(data["images"], key=lambda im: int(im["id"])):
                texts = captions.get(int(image["id"]))
                if texts:
                    yield Sample(self.image_dirs[split] / str(image["file_name"]), tuple(texts), split)


@dataclass(frozen=True)
class TaggedFolderReader:
    """A folder of images and a CSV with columns image,tags[,split]; tags separated by ';', '|' or ','."""

    folder: Path
    csv_path: Path
    name: str = "tagged-folder"
    kind: str = "tags"

    def samples(self) -> Iterator[Sample]:
        with self.csv_path.open(newline="", encoding="utf-8") as fh:
            for row in csv.DictReader(fh):
                tags = tuple(t.strip() for t in TAG_SEPARATORS.split(row["tags"]) if t.strip())
                split = (row.get("split") or "train").strip()
                if split not in SPLITS:
                    raise ValueError(f"{self.csv_path}: unknown split {split!r} for {row['image']}")
                if tags:
                    yield Sample(self.folder / row["image"], tags, split)


def open_dataset(path: Path) -> DatasetReader:
    """Recognise the layout at `path`: Flickr8k directory, COCO root or captions JSON, or folder with tags.csv."""
    if path.is_file() and path.suffix == ".json":
        split = "dev" if "val" in path.stem else "test" if "test" in path.stem else "train"
        image_dir = path.parent.parent / path.stem.split("_")[-1]
        return CocoCaptionsReader({split: path}, {split: image_dir}, name=f"coco-{path.stem}")
    if (path / "captions.csv").exists() and (path / "splits").is_dir():
        return Flickr8kReader(path, name=path.name or "flickr8k")
    coco = sorted((path / "annotations").glob("captions_*.json")) if (path / "annotations").is_dir() else []
    if coco:
        annotations: dict[str, Path] = {}
        image_dirs: dict[str, Path] = {}
        for ann in coco:
            part = ann.stem.split("_")[-1]  # e.g. train2017, val2017
            split = "dev" if part.startswith("val") else "test" if part.startswith("test") else "train"
            annotations[split] = ann
            image_dirs[split] = path / part
        return CocoCaptionsReader(annotations, image_dirs, name=f"coco-{path.name}")
    if (path / "tags.csv").exists():
        return TaggedFolderReader(path, path / "tags.csv", name=path.name or "tagged-folder")
    raise ValueError(
        f"{path}: not a Flickr8k directory (captions.csv + splits/), a COCO root (annotations/captions_*.json), "
        "a COCO captions JSON file or a folder with tags.csv"
    )


def fingerprint(samples: Sequence[Sample]) -> str:
    """A short hash of the image list (paths and sizes): the feature cache key of a dataset."""
    digest = hashlib.sha256()
    for s in samples:
        size = s.image.stat().st_size if s.image.exists() else -1
        digest.update(f"{s.image.name}\t{size}\n".encode())
    return digest.hexdigest()[:12]
