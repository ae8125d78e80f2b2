"""The served default head on Flickr8k test photos (runs where ../shared/data/flickr8k is present)."""

from __future__ import annotations

import csv
from collections.abc import Iterator
from pathlib import Path

import pytest

from imgsearch.client import GatewayClient, ImageToAdd
from imgsearch.devstack import Stack, free_port_range

FLICKR = Path(__file__).resolve().parents[3] / "shared" / "data" / "flickr8k"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (FLICKR / "splits" / "test.txt").exists(), reason="needs ../shared/data/flickr8k"),
]


def captions() -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    with (FLICKR / "captions.csv").open() as fh:
        for row in csv.DictReader(fh):
            out.setdefault(row["image"], []).append(row["caption"].lower())
    return out


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory, model_dir: Path) -> Iterator[GatewayClient]:
    stack = Stack(tmp_path_factory.mktemp("flickr-stack"))
    specs = stack.up(free_port_range(20), free_port_range(20), shards=2, timeout=300)
    try:
        gateway = next(s for s in specs if s.name == "gateway").address
        with GatewayClient(gateway, timeout=300) as c:
            names = (FLICKR / "splits" / "test.txt").read_text().split()
            outcomes = c.add_images(ImageToAdd.from_path(FLICKR / "images" / n, Path(n).stem) for n in names)
            assert all(o.ok for o in outcomes)
            yield c
    finally:
        stack.down()


def test_two_dogs_in_the_snow_finds_a_matching_photo_first(client: GatewayClient) -> None:
    res = client.search_text("two dogs playing in the snow", k=5)
    assert res.head.startswith("default@")
    top = captions()[f"{res.hits[0].id}.jpg"]
    assert any("dog" in c for c in top) and any("snow" in c for c in top), top
