"""Pipelined ingest through a real stack: results stream back while images are still being sent."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from PIL import Image

from imgsearch.api.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from imgsearch.client import AsyncGatewayClient, GatewayClient, ImageToAdd, ItemOutcome
from imgsearch.devstack import Stack
from imgsearch.gateway.settings import GatewaySettings
from tests.harness import free_port_range

pytestmark = pytest.mark.slow

BATCH = GatewaySettings.model_fields["add_batch_size"].default


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, model_dir: Path) -> Iterator[Stack]:
    s = Stack(tmp_path_factory.mktemp("ingest"))
    s.up(free_port_range(20), free_port_range(20), shards=2, timeout=300)
    try:
        yield s
    finally:
        s.down()


@pytest.fixture(scope="module")
def address(stack: Stack) -> str:
    return str(json.loads(stack.state_file.read_text())["gateway"])


@pytest.fixture(scope="module")
def client(address: str) -> Iterator[GatewayClient]:
    with GatewayClient(address, timeout=60) as c:
        yield c


def photo(seed: int) -> bytes:
    """A distinct small JPEG per seed."""
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).resize((256, 192))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=85)
    return buf.getvalue()


def test_results_arrive_while_the_request_stream_is_still_open(client: GatewayClient) -> None:
    """The sender refuses to send image 3*BATCH until results came back: only real streaming gets past it."""
    first_result = threading.Event()
    sent_when_first_result: list[int] = []
    sent = 0
    total = 4 * BATCH

    def images() -> Iterator[ImageToAdd]:
        nonlocal sent
        for i in range(total):
            if i == 3 * BATCH:
                # Runs on gRPC's sending thread; results are read on this test's thread meanwhile.
                assert first_result.wait(120), "no result came back while the request stream was open"
            sent += 1
            yield ImageToAdd(photo(i), f"progress-{i}", {"n": str(i)})

    outcomes: list[ItemOutcome] = []
    for o in client.add_images_stream(images()):
        if not first_result.is_set():
            sent_when_first_result.append(sent)
            first_result.set()
        outcomes.append(o)
    assert sent == total and len(outcomes) == total and all(o.ok for o in outcomes)
    assert sent_when_first_result[0] < total, "the first result only came after every image was sent"
    assert sorted(o.position for o in outcomes) == list(range(total))
    assert {o.id for o in outcomes} == {f"progress-{i}" for i in range(total)}
    assert len(client.get_images([f"progress-{i}" for i in range(total)]).images) == total


def test_add_images_returns_every_outcome_in_order_and_bad_items_fail_alone(client: GatewayClient) -> None:
    images = [ImageToAdd(photo(100 + i), f"ordered-{i}") for i in range(2 * BATCH + 3)]
    images[5] = ImageToAdd(b"not an image at all", "ordered-bad")
    images[BATCH + 1] = ImageToAdd(b"", "ordered-empty")
    seen: list[ItemOutcome] = []
    outcomes = client.add_images(images, on_result=seen.append)
    assert [o.position for o in outcomes] == list(range(len(images)))
    assert [o.id for o in outcomes] == [im.id for im in images]
    assert [i for i, o in enumerate(outcomes) if not o.ok] == [5, BATCH + 1]
    assert outcomes[5].code == "INVALID_ARGUMENT" and outcomes[BATCH + 1].code == "INVALID_ARGUMENT"
    assert sorted(seen, key=lambda o: o.position) == outcomes


def test_unary_add_images_rpc_still_answers_in_stream_order(address: str) -> None:
    with grpc.insecure_channel(address) as channel:
        stub = gateway_pb2_grpc.GatewayServiceStub(channel)
        reqs = (gateway_pb2.AddImagesRequest(id=f"unary-{i}", image=photo(200 + i)) for i in range(BATCH + 5))
        resp = stub.AddImages(reqs, timeout=120)
    assert [r.position for r in resp.results] == list(range(BATCH + 5))
    assert resp.added == BATCH + 5 and resp.failed == 0


def test_a_later_image_with_the_same_id_wins_across_batches(client: GatewayClient) -> None:
    # Batches are encoded concurrently but written in stream order: the last write is the last sent.
    images = [ImageToAdd(photo(300 + i), f"dup-filler-{i}") for i in range(3 * BATCH)]
    images[0] = ImageToAdd(photo(400), "dup", {"version": "first"})
    images[-1] = ImageToAdd(photo(401), "dup", {"version": "last"})
    outcomes = client.add_images(images)
    assert all(o.ok for o in outcomes)
    assert client.get_images(["dup"]).images[0].metadata == {"version": "last"}


def test_an_empty_stream_is_invalid_argument(address: str) -> None:
    with grpc.insecure_channel(address) as channel:
        stub = gateway_pb2_grpc.GatewayServiceStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            list(stub.AddImagesStream(iter([]), timeout=30))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_async_client_streams_outcomes_as_they_are_stored(address: str) -> None:
    async with AsyncGatewayClient(address, timeout=60) as c:
        started = time.perf_counter()
        firsts: list[float] = []
        outcomes = []
        async for o in c.add_images_stream(ImageToAdd(photo(500 + i), f"async-{i}") for i in range(2 * BATCH)):
            firsts.append(time.perf_counter() - started)
            outcomes.append(o)
    assert len(outcomes) == 2 * BATCH and all(o.ok for o in outcomes)
    assert sorted(o.position for o in outcomes) == list(range(2 * BATCH))


def test_cli_add_reports_every_file_with_failures_in_place(address: str, tmp_path: Path) -> None:
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(BATCH + 4):
        (folder / f"cli-{i:02d}.jpg").write_bytes(photo(600 + i))
    (folder / "cli-07.jpg").write_bytes(b"broken")
    proc = subprocess.run(
        [sys.executable, "-m", "imgsearch.client.cli", "--address", address, "--json", "add", str(folder)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 1, proc.stderr  # one image failed
    out = json.loads(proc.stdout)
    assert (out["added"], out["failed"]) == (BATCH + 3, 1)
    results = out["results"]
    assert [r["position"] for r in results] == list(range(BATCH + 4))
    assert [r["id"] for r in results if not r["ok"]] == ["cli-07"]
