"""The served default head on Flickr8k test photos (runs where ../shared/data/flickr8k is present)."""

from __future__ import annotations

import csv
from collections.abc import Iterator
from pathlib import Path

import pytest

from imgsearch.client import GatewayClient
from imgsearch.devstack import Stack, free_port_range
from imgsearch.heads.model import read_head_manifest
from imgsearch.training.served_retrieval import add_photos, caption_queries, served_recall, split_photos

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
            add_photos(c, split_photos(FLICKR))
            yield c
    finally:
        stack.down()


def test_two_dogs_in_the_snow_finds_a_matching_photo_first(client: GatewayClient) -> None:
    res = client.search_text("two dogs playing in the snow", k=5)
    assert res.head.startswith("default@")
    top = captions()[f"{res.hits[0].id}.jpg"]
    assert any("dog" in c for c in top) and any("snow" in c for c in top), top


def test_served_search_ranks_as_the_heads_evaluation_says(client: GatewayClient) -> None:
    """All 5000 test captions through the gateway: recall within the int8 models' allowance of the head file's
    own fp32 evaluation (a served path that skipped the head's search hubness fold would lose about 2.4 R@10)."""
    photos = split_photos(FLICKR)
    result = served_recall(client, caption_queries(FLICKR, photos))
    name, version = result.head.split("@")
    manifest = read_head_manifest(Path(__file__).resolve().parents[2] / "heads" / f"{name}.npz")
    assert manifest["version"] == version
    recorded = manifest["metrics"]["test_t2i_r10"]
    # The int8 quality gates allow 0.5 point of R@10 each for the image and the text model.
    assert result.recall[10] >= recorded - 1.0, (result, recorded)
    assert result.recall[1] <= result.recall[5] <= result.recall[10]
