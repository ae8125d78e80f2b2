"""The whole stack on loopback with the real models: the issue's acceptance scenarios, end to end."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from PIL import Image

from imgsearch.api.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from imgsearch.client import GatewayClient, ImageToAdd, SearchFilter
from imgsearch.devstack import GALLERY, Stack, alive, health
from tests.harness import free_port_range

pytestmark = pytest.mark.slow
CLI = [sys.executable, "-m", "imgsearch.client.cli"]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, model_dir: Path) -> Iterator[Stack]:
    state = tmp_path_factory.mktemp("stack")
    s = Stack(state)
    base = free_port_range(20)
    metrics_base = free_port_range(20)
    specs = s.up(base, metrics_base, shards=2, timeout=300)
    try:
        gateway = next(x for x in specs if x.name == "gateway").address
        assert s.index_gallery(gateway) == len(GALLERY)
        yield s
    finally:
        s.down()


@pytest.fixture(scope="module")
def client(stack: Stack) -> Iterator[GatewayClient]:
    with GatewayClient(json.loads(stack.state_file.read_text())["gateway"], timeout=60) as c:
        yield c


def gallery(stack: Stack, name: str) -> bytes:
    return next((stack.state_dir / "gallery").glob(f"{name}.*")).read_bytes()


def png(width: int, height: int, mode: str = "1") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, (width, height)).save(buf, format="PNG")
    return buf.getvalue()


def test_tagging_the_cat_and_an_unseen_tag_live(stack: Stack, client: GatewayClient) -> None:
    cat = gallery(stack, "cat")
    top = [t.tag for t in client.tag(cat, k=3).tags]
    assert "cat" in top, top
    outcome = client.add_tags(["feline"])
    assert outcome[0].ok
    res = client.tag(cat, k=5)
    tags = {t.tag: t for t in res.tags}
    assert "feline" in tags, list(tags)
    assert tags["feline"].seen is False and tags["cat"].seen is True
    assert any(t.name == "feline" and not t.seen for t in client.list_tags("unseen"))


def test_text_search_finds_the_coffee(client: GatewayClient) -> None:
    res = client.search_text("a cup of coffee", k=5)
    assert res.hits[0].id == "coffee", [h.id for h in res.hits]
    assert not res.partial and res.space == "semantic" and res.head


@pytest.mark.parametrize("name", sorted(GALLERY))
def test_image_search_returns_the_stored_photo_first(stack: Stack, client: GatewayClient, name: str) -> None:
    res = client.search_image(gallery(stack, name), k=3)
    assert res.hits[0].id == name
    assert res.hits[0].score == pytest.approx(1.0, abs=1e-3)


def test_similar_by_id_excludes_itself_and_ranks_like_exact_search(client: GatewayClient) -> None:
    res = client.similar("astronaut", k=len(GALLERY))
    ids = [h.id for h in res.hits]
    assert "astronaut" not in ids and len(ids) == len(GALLERY) - 1
    scores = [h.score for h in res.hits]
    assert scores == sorted(scores, reverse=True)
    with_self = client.similar("astronaut", k=1, include_self=True)
    assert with_self.hits[0].id == "astronaut"
    semantic = client.similar("rocket", k=3, space="semantic")
    assert semantic.space == "semantic" and semantic.hits


def test_bad_inputs_get_precise_statuses_and_servers_keep_serving(stack: Stack, client: GatewayClient) -> None:
    cases: list[tuple[Callable[[], object], grpc.StatusCode, str]] = [
        (lambda: client.tag(b"\xff\xd8\xff\xe0" + b"garbage" * 20), grpc.StatusCode.INVALID_ARGUMENT, "image"),
        (lambda: client.tag(b""), grpc.StatusCode.INVALID_ARGUMENT, "empty"),
        (lambda: client.search_image(png(20000, 20000)), grpc.StatusCode.INVALID_ARGUMENT, "pixels"),
        (lambda: client.search_text("   "), grpc.StatusCode.INVALID_ARGUMENT, "query is empty"),
        (lambda: client.search_text("dogs", k=100000), grpc.StatusCode.INVALID_ARGUMENT, "between 1 and"),
        (lambda: client.similar("no-such-image"), grpc.StatusCode.NOT_FOUND, "not stored"),
        (lambda: client.delete_images([]), grpc.StatusCode.INVALID_ARGUMENT, "no ids"),
    ]
    for call, code, words in cases:
        with pytest.raises(grpc.RpcError) as info:
            call()
        assert info.value.code() == code, info.value.details()
        assert words in (info.value.details() or ""), info.value.details()
    for spec in stack.load():
        assert health(spec.address) == "SERVING", spec.name


def test_one_bad_image_in_a_batch_fails_alone(stack: Stack, client: GatewayClient) -> None:
    good = gallery(stack, "coffee")
    outcomes = client.add_images(
        [
            ImageToAdd(good, "batch-good-1"),
            ImageToAdd(b"not an image at all", "batch-bad"),
            ImageToAdd(b"", "batch-empty"),
            ImageToAdd(png(20000, 20000), "batch-bomb"),
            ImageToAdd(good, "x" * 300),
            ImageToAdd(gallery(stack, "moon"), "batch-good-2"),
        ]
    )
    assert [o.ok for o in outcomes] == [True, False, False, False, False, True]
    assert all(o.code == "INVALID_ARGUMENT" for o in outcomes if not o.ok)
    got = client.get_images(["batch-good-1", "batch-good-2", "batch-bad"])
    assert sorted(i.id for i in got.images) == ["batch-good-1", "batch-good-2"]
    assert list(got.missing_ids) == ["batch-bad"]
    client.delete_images(["batch-good-1", "batch-good-2"])


def test_a_killed_shard_gives_partial_results_and_loses_nothing(stack: Stack, client: GatewayClient) -> None:
    rng = np.random.default_rng(7)
    # Acknowledged writes right before the crash: new images, and a delete.
    noise = [ImageToAdd(_noise_png(rng), f"noise-{i}", {"n": str(i)}, f"noise-{i}.png") for i in range(12)]
    assert all(o.ok for o in client.add_images(noise))
    deleted, _ = client.delete_images(["noise-0"])
    assert deleted[0].ok
    before = {i.id for i in client.get_images([*GALLERY, *(n.id for n in noise)]).images}
    assert "noise-0" not in before and len(before) == len(GALLERY) + 11

    victim = next(s for s in stack.load() if s.name == "index-1")
    os.kill(victim.pid, signal.SIGKILL)
    while alive(victim.pid):
        pass
    res = client.search_text("a cup of coffee", k=5)
    assert res.partial and res.failed_shards == ["index-1"]
    assert res.hits, "the surviving shard still answers"
    image_res = client.search_image(gallery(stack, "rocket"), k=3)
    assert image_res.partial

    stack.restart("index-1", timeout=120)
    # The gateway's channel reconnects with a short backoff; until then reads say they are partial.
    deadline = time.monotonic() + 10
    while (got := client.get_images([*GALLERY, *(n.id for n in noise)])).partial and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not got.partial
    after = {i.id for i in got.images}
    assert after == before
    assert not client.search_text("a cup of coffee", k=5).partial
    stored = client.get_images(["noise-5"]).images[0]
    assert dict(stored.metadata) == {"n": "5"} and stored.source_name == "noise-5.png"


def _noise_png(rng: np.random.Generator) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (64, 96, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def test_cli_json_output(stack: Stack) -> None:
    gateway = json.loads(stack.state_file.read_text())["gateway"]
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "imgsearch.client.cli",
            "--address",
            gateway,
            "--json",
            "search-text",
            "a cup of coffee",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    doc = json.loads(out.stdout)
    assert doc["hits"][0]["id"] == "coffee"
    bad = subprocess.run(
        [sys.executable, "-m", "imgsearch.client.cli", "--address", gateway, "search-text", "x", "-k", "0"],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and "not in the range" in bad.stderr


def test_a_tagger_outage_stops_only_tagging_and_the_vocabulary_survives(stack: Stack, client: GatewayClient) -> None:
    added = client.add_tags(["zebra crossing", "Lighthouse at dusk"])
    assert all(o.ok and o.changed for o in added)
    removed = client.remove_tags(["kite"])
    assert removed[0].ok
    tagger = next(s for s in stack.load() if s.name == "tagger")
    os.kill(tagger.pid, signal.SIGKILL)
    while alive(tagger.pid):
        pass
    # Projection runs in the gateway: adding and every kind of search need only the encoder and the shards.
    outcomes = client.add_images([ImageToAdd(gallery(stack, "coffee"), "during-tagger-outage")])
    assert outcomes[0].ok, outcomes[0].error
    assert client.search_text("a cup of coffee", k=3).hits[0].id in {"coffee", "during-tagger-outage"}
    assert client.search_image(gallery(stack, "rocket"), k=1).hits[0].id == "rocket"
    assert client.search_image(gallery(stack, "rocket"), k=1, space="semantic").hits[0].id == "rocket"
    with pytest.raises(grpc.RpcError) as info:
        client.tag(gallery(stack, "cat"), k=3)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "127.0.0.1" not in (info.value.details() or ""), "public messages must not carry internal addresses"
    stack.restart("tagger", timeout=120)
    # No gateway action: its channel reconnects on its own, within its reconnect backoff (at most 1 s).
    deadline = time.monotonic() + 5
    while True:
        try:
            assert client.tag(gallery(stack, "cat"), k=3).tags[0].tag
            break
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.UNAVAILABLE and time.monotonic() < deadline, exc
            time.sleep(0.1)
    names = {t.name for t in client.list_tags()}
    assert {"zebra crossing", "Lighthouse at dusk"} <= names
    assert "kite" not in names
    client.delete_images(["during-tagger-outage"])


def test_sigterm_drains_an_in_flight_add(stack: Stack, client: GatewayClient) -> None:
    gateway = next(s for s in stack.load() if s.name == "gateway")
    photo = gallery(stack, "astronaut")
    sent = 0

    def stream() -> Iterator[ImageToAdd]:
        nonlocal sent
        for i in range(40):
            if i == 5:
                # The gateway is told to stop while this call is still streaming in.
                os.kill(gateway.pid, signal.SIGTERM)
            sent += 1
            yield ImageToAdd(photo, f"drain-{i}")

    outcomes = client.add_images(stream())
    assert sent == 40 and len(outcomes) == 40 and all(o.ok for o in outcomes)
    deadline = time.monotonic() + 30
    while alive(gateway.pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not alive(gateway.pid), "the gateway must exit after draining"
    assert "stopped" in (stack.logs / "gateway.log").read_text()
    stack.restart("gateway", timeout=60)
    assert len(client.get_images([f"drain-{i}" for i in range(40)]).images) == 40


def _wait_for_active(stub: gateway_pb2_grpc.GatewayServiceStub, head: str, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        status = stub.ListHeads(gateway_pb2.ListHeadsRequest(), timeout=10).status
        if status.active == head and not status.building:
            return
        assert time.monotonic() < deadline, f"head {head} not active after {timeout}s: {status}"
        time.sleep(0.2)


def test_a_head_switch_builds_then_flips_with_no_failed_search(stack: Stack, client: GatewayClient) -> None:
    address = json.loads(stack.state_file.read_text())["gateway"]
    errors: list[str] = []
    done = {"n": 0}
    stop = threading.Event()
    cat, coffee = gallery(stack, "cat"), gallery(stack, "coffee")

    def searches() -> None:
        # Every kind of search, in a loop, while the switch is built and flipped (and back).
        with GatewayClient(address, timeout=30) as c:
            while not stop.is_set():
                try:
                    assert c.search_text("a cup of coffee", k=5).hits
                    assert c.search_image(cat, k=3, space="semantic").hits
                    assert c.search_image(coffee, k=3).hits
                    done["n"] += 1
                except (grpc.RpcError, AssertionError) as exc:
                    errors.append(repr(exc))

    with grpc.insecure_channel(address) as channel:
        stub = gateway_pb2_grpc.GatewayServiceStub(channel)
        original = stub.ListHeads(gateway_pb2.ListHeadsRequest(), timeout=10).active
        with pytest.raises(grpc.RpcError) as info:
            stub.ActivateHead(gateway_pb2.ActivateHeadRequest(head="/etc/passwd.npz"), timeout=10)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        target = next(
            f"{h.name}@{h.version}"
            for h in stub.ListHeads(gateway_pb2.ListHeadsRequest(), timeout=10).heads
            if h.name == "linear-infonce"
        )
        loop = threading.Thread(target=searches, daemon=True)
        loop.start()
        try:
            started = stub.ActivateHead(gateway_pb2.ActivateHeadRequest(head="linear-infonce"), timeout=10)
            assert started.status.building == target and started.status.active == original
            assert started.previous == original
            _wait_for_active(stub, target)
            # Backfilled from what the shards keep, each image's vector equals a fresh projection of its bytes.
            for name in ("cat", "coffee", "rocket"):
                res = client.search_image(gallery(stack, name), k=1, space="semantic")
                assert res.head == target and not res.partial
                assert res.hits[0].id == name and res.hits[0].score == pytest.approx(1.0, abs=1e-3)
            # And back, as an operator would: the CLI starts the switch, the flip follows when it is built.
            back = subprocess.run(
                [*CLI, "heads", "activate", original, "--address", address],
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert back.returncode == 0, back.stderr
            _wait_for_active(stub, original)
        finally:
            stop.set()
            loop.join(timeout=60)
    assert not errors, errors[:5]
    assert done["n"] > 0
    assert client.search_text("a cup of coffee", k=3).hits[0].id == "coffee"
    res = client.search_image(gallery(stack, "cat"), k=1, space="semantic")
    assert res.head == original and res.hits[0].id == "cat"
    # The default head folds its search hubness correction into the vectors, so a photo's score against itself
    # is (1 - its offset) / the vectors' norms, not 1: a fresh projection of the bytes (above) and the vector the
    # backfill stored (by id) must give it the same score.
    by_id = client.similar("cat", k=1, space="semantic", include_self=True)
    assert by_id.head == original and by_id.hits[0].id == "cat"
    assert by_id.hits[0].score == pytest.approx(res.hits[0].score, abs=2e-3)


def test_bad_requests_leave_no_error_line_or_traceback_in_any_log(stack: Stack, client: GatewayClient) -> None:
    marks = {p.name: p.stat().st_size for p in stack.logs.glob("*.log")}
    for call in (
        lambda: client.search_text("dogs", k=100000),
        lambda: client.search_text("   "),
        lambda: client.tag(b"\xff\xd8\xff\xe0" + b"garbage" * 20),
        lambda: client.similar("no-such-image"),
    ):
        with pytest.raises(grpc.RpcError):
            call()
    address = json.loads(stack.state_file.read_text())["gateway"]
    with grpc.insecure_channel(address) as channel:
        raw = channel.unary_unary(
            "/imgsearch.gateway.v1.GatewayService/SearchByText",
            request_serializer=lambda b: b,
            response_deserializer=lambda b: b,
        )
        with pytest.raises(grpc.RpcError) as info:
            raw(b"\xff\xff\xff\xff garbage", timeout=10)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
    time.sleep(0.5)
    for path in stack.logs.glob("*.log"):
        with path.open("rb") as f:
            f.seek(marks.get(path.name, 0))
            text = f.read().decode(errors="replace")
        assert "Traceback" not in text, f"{path.name}:\n{text[-2000:]}"
        for line in text.splitlines():
            if line.startswith("{"):
                assert json.loads(line).get("level") not in ("ERROR", "CRITICAL"), f"{path.name}: {line}"


def test_a_search_trace_id_reaches_the_logs_of_every_service_it_crossed(stack: Stack) -> None:
    address = json.loads(stack.state_file.read_text())["gateway"]
    trace_id = os.urandom(16).hex()
    # W3C trace context from the caller: every hop continues the caller's trace.
    traceparent = f"00-{trace_id}-{os.urandom(8).hex()}-01"
    with grpc.insecure_channel(address) as channel:
        stub = gateway_pb2_grpc.GatewayServiceStub(channel)
        stub.SearchByText(
            gateway_pb2.SearchByTextRequest(query="a cup of coffee", k=3),
            timeout=30,
            metadata=(("traceparent", traceparent),),
        )
    time.sleep(0.5)
    for name in ("gateway", "encoder", "index-0", "index-1"):
        lines = [
            json.loads(line)
            for line in (stack.logs / f"{name}.log").read_text(errors="replace").splitlines()
            if line.startswith("{")
        ]
        assert any(rec.get("trace_id") == trace_id for rec in lines), f"trace {trace_id} not in {name}.log"


def test_filtered_paged_search_from_the_cli_and_the_sdk(stack: Stack, client: GatewayClient) -> None:
    names = sorted(GALLERY)[:8]
    images = [
        ImageToAdd(gallery(stack, name), f"album-{name}", {"album": "holiday" if i % 2 == 0 else "work"})
        for i, name in enumerate(names)
    ]
    assert all(o.ok for o in client.add_images(images))
    holiday = {f"album-{n}" for i, n in enumerate(names) if i % 2 == 0}
    address = json.loads(stack.state_file.read_text())["gateway"]
    cli = [sys.executable, "-m", "imgsearch.client.cli", "--address", address, "--json"]
    seen: list[str] = []
    token = ""
    for _ in range(5):
        extra = ["--page-token", token] if token else []
        out = subprocess.run(
            [
                *cli,
                "search-text",
                "a photo",
                "--filter",
                "album=holiday",
                "--min-score",
                "-1",
                "--page-size",
                "3",
                *extra,
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        page = json.loads(out.stdout)
        assert all(h["metadata"]["album"] == "holiday" for h in page["hits"])
        seen.extend(h["id"] for h in page["hits"])
        token = page["next_page_token"]
        if not token:
            break
    assert sorted(seen) == sorted(holiday) and len(seen) == len(set(seen)), seen
    # The same through the SDK: the first page is the first three of the full filtered ranking.
    everything = client.search_text("a photo", k=10, filter=SearchFilter(metadata={"album": "holiday"}))
    first = client.search_text("a photo", k=3, filter=SearchFilter(metadata={"album": "holiday"}))
    assert [h.id for h in first.hits] == [h.id for h in everything.hits[:3]]
    rest = client.search_text(
        "a photo", k=10, filter=SearchFilter(metadata={"album": "holiday"}), page_token=first.next_page_token
    )
    assert [h.id for h in first.hits + rest.hits] == [h.id for h in everything.hits]
    none = client.search_text("a photo", filter=SearchFilter(metadata={"album": "no-such-album"}))
    assert none.hits == [] and not none.partial
    client.delete_images([i.id for i in images])


def test_a_hung_shard_gives_a_partial_answer_within_the_deadline(stack: Stack, client: GatewayClient) -> None:
    shard = next(s for s in stack.load() if s.name == "index-1")
    address = json.loads(stack.state_file.read_text())["gateway"]
    os.kill(shard.pid, signal.SIGSTOP)
    try:
        with grpc.insecure_channel(address) as channel:
            stub = gateway_pb2_grpc.GatewayServiceStub(channel)
            start = time.monotonic()
            resp = stub.SearchByText(gateway_pb2.SearchByTextRequest(query="a cup of coffee", k=5), timeout=3.0)
            elapsed = time.monotonic() - start
        assert resp.meta.partial and list(resp.meta.failed_shards) == ["index-1"]
        assert resp.hits, "the other shard's hits come back"
        assert elapsed < 3.0
    finally:
        os.kill(shard.pid, signal.SIGCONT)


def test_relevance_feedback_from_the_cli_and_the_sdk(stack: Stack, client: GatewayClient) -> None:
    address = json.loads(stack.state_file.read_text())["gateway"]
    out = subprocess.run(
        [*CLI, "more-like", "cat", "astronaut", "--not", "coffee", "-k", "4", "--address", address, "--json"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    cli_ids = [h["id"] for h in json.loads(out.stdout)["hits"]]
    sdk = client.search_by_examples(["cat", "astronaut"], ["coffee"], k=4)
    assert cli_ids == [h.id for h in sdk.hits] and len(cli_ids) == 4
    assert not {"cat", "astronaut", "coffee"} & set(cli_ids), "examples are left out of the hits"
    # Text alone is Rocchio with no examples: exactly the text search.
    text_only = client.search_by_examples([], text="a cup of coffee", k=3)
    plain = client.search_text("a cup of coffee", k=3)
    assert text_only.space == "semantic" and [h.id for h in text_only.hits] == [h.id for h in plain.hits]
    assert [h.score for h in text_only.hits] == pytest.approx([h.score for h in plain.hits], abs=1e-5)
    with_text = client.search_by_examples(["rocket"], text="a cup of coffee", k=3)
    assert with_text.space == "semantic" and "rocket" not in [h.id for h in with_text.hits]


def test_thumbnails_are_kept_with_each_record_and_served_over_http(stack: Stack) -> None:
    gateway = next(s for s in stack.load() if s.name == "gateway")
    with grpc.insecure_channel(gateway.address) as channel:
        stub = gateway_pb2_grpc.GatewayServiceStub(channel)
        got = stub.GetImages(gateway_pb2.GetImagesRequest(ids=["cat", "rocket"], include_thumbnails=True), timeout=10)
        plain = stub.GetImages(gateway_pb2.GetImagesRequest(ids=["cat"]), timeout=10)
    assert plain.images[0].thumbnail == b"", "thumbnails only when asked for"
    for image in got.images:
        with Image.open(io.BytesIO(image.thumbnail)) as im:
            assert im.format == "JPEG" and max(im.size) == 160, image.id
    url = f"http://127.0.0.1:{gateway.env['IMGSEARCH_GATEWAY_HTTP_PORT']}/v1/thumbnails/cat"
    with urllib.request.urlopen(url, timeout=10) as resp:
        assert resp.headers["Content-Type"] == "image/jpeg"
        assert resp.read() == next(i.thumbnail for i in got.images if i.id == "cat")
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(url.replace("/cat", "/no-such-image"), timeout=10)
    assert info.value.code == 404
