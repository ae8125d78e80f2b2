"""The real encoder server as a subprocess: contract, per-item errors, limits, metrics, reflection, shutdown."""

from __future__ import annotations

import io
import struct
import time
import urllib.request
import zlib
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from imgsearch.api.encoder.v1 import encoder_pb2, encoder_pb2_grpc
from imgsearch.kit.convert import from_vector
from tests.harness import ServiceProcess

SERVICE = "imgsearch.encoder.v1.EncoderService"
CAT_CLASSES = range(281, 286)
INVALID_ARGUMENT = grpc.StatusCode.INVALID_ARGUMENT.value[0]


def png_bomb(width: int, height: int) -> bytes:
    """A valid all-black 1-bit PNG of the given size that is only a few KB long."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    row = b"\x00" * (1 + (width + 7) // 8)
    packer = zlib.compressobj(9)
    data = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", data) + chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    log = tmp_path_factory.mktemp("encoder") / "encoder.log"
    proc = ServiceProcess("encoder", env={"IMGSEARCH_ENCODER_MAX_WAIT_MS": "2"}, log_path=log).start()
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def channel(server: ServiceProcess) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(server.address, options=[("grpc.max_receive_message_length", 64 << 20)]) as ch:
        yield ch


@pytest.fixture(scope="module")
def stub(channel: grpc.Channel) -> encoder_pb2_grpc.EncoderServiceStub:
    return encoder_pb2_grpc.EncoderServiceStub(channel)


def images(*items: tuple[str, bytes], logits: bool = False) -> encoder_pb2.EncodeImagesRequest:
    return encoder_pb2.EncodeImagesRequest(
        images=[encoder_pb2.ImageInput(name=n, data=d) for n, d in items], include_logits=logits
    )


def scrape(server: ServiceProcess) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    with urllib.request.urlopen(server.metrics_url, timeout=5) as resp:
        text = resp.read().decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def sample(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float:
    want = set(labels.items())
    return sum(v for (n, lbl), v in samples.items() if n == name and want <= lbl)


def test_health_is_serving_for_the_service(channel: grpc.Channel) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    for name in ("", SERVICE):
        resp = health.Check(health_pb2.HealthCheckRequest(service=name), timeout=5)
        assert resp.status == health_pb2.HealthCheckResponse.SERVING


def test_encode_images_classifies_real_photos(
    stub: encoder_pb2_grpc.EncoderServiceStub, sample_photos: dict[str, bytes]
) -> None:
    info = stub.GetModelInfo(encoder_pb2.GetModelInfoRequest(), timeout=10)
    resp = stub.EncodeImages(
        images(("chelsea.png", sample_photos["cat"]), ("coffee.png", sample_photos["coffee"]), logits=True),
        timeout=60,
    )
    assert resp.model_version == info.image_model_version
    cat, coffee = (r.encoding for r in resp.results)
    assert (cat.width, cat.height) == (451, 300)
    # Vectors travel packed (little-endian float32 bytes), not as repeated floats.
    assert cat.features.packed_f32 and not cat.features.values
    features, logits = from_vector(cat.features, 1280), from_vector(cat.logits, 1000)
    assert int(np.argmax(logits)) in CAT_CLASSES
    coffee_top3 = {info.class_labels[i] for i in np.argsort(from_vector(coffee.logits))[-3:]}
    assert coffee_top3 & {"espresso", "tea cup", "coffee mug"}, coffee_top3
    without = stub.EncodeImages(images(("chelsea.png", sample_photos["cat"])), timeout=60)
    assert not without.results[0].encoding.HasField("logits")
    np.testing.assert_allclose(from_vector(without.results[0].encoding.features), features, atol=1e-4)


def test_bad_items_fail_alone_and_the_server_keeps_serving(
    server: ServiceProcess, stub: encoder_pb2_grpc.EncoderServiceStub, sample_photos: dict[str, bytes]
) -> None:
    resp = stub.EncodeImages(
        images(
            ("cat.png", sample_photos["cat"]),
            ("garbage.jpg", b"\x00\x01 this is not a JPEG at all" * 10),
            ("empty.png", b""),
            ("bomb.png", png_bomb(20_000, 20_000)),
            ("rocket.jpg", sample_photos["rocket"]),
        ),
        timeout=60,
    )
    kinds = [r.WhichOneof("result") for r in resp.results]
    assert kinds == ["encoding", "error", "error", "error", "encoding"]
    for i, (name, why) in {1: ("garbage.jpg", "not a recognisable image"), 2: ("empty.png", "empty"),
                           3: ("bomb.png", "20000x20000")}.items():  # fmt: skip
        err = resp.results[i].error
        assert err.code == INVALID_ARGUMENT
        assert f"item {i} ('{name}')" in err.message and why in err.message, err.message
    assert health_status_ok(server)
    again = stub.EncodeImages(images(("cat.png", sample_photos["cat"])), timeout=60)
    assert again.results[0].HasField("encoding")


def test_thumbnails_when_asked_for_and_an_out_of_range_size_is_invalid(
    stub: encoder_pb2_grpc.EncoderServiceStub, sample_photos: dict[str, bytes]
) -> None:
    request = images(("cat.png", sample_photos["cat"]), ("garbage.jpg", b"not an image" * 10))
    request.thumbnail_px = 160
    resp = stub.EncodeImages(request, timeout=60)
    assert [r.WhichOneof("result") for r in resp.results] == ["encoding", "error"]
    with Image.open(io.BytesIO(resp.results[0].encoding.thumbnail)) as im:
        assert im.format == "JPEG" and im.size == (160, 106)
    plain = stub.EncodeImages(images(("cat.png", sample_photos["cat"])), timeout=60)
    assert plain.results[0].encoding.thumbnail == b""
    request.thumbnail_px = 1025
    with pytest.raises(grpc.RpcError) as info:
        stub.EncodeImages(request, timeout=60)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "thumbnail_px is 1025" in str(info.value.details())


def health_status_ok(server: ServiceProcess) -> bool:
    with grpc.insecure_channel(server.address) as ch:
        resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
    return bool(resp.status == health_pb2.HealthCheckResponse.SERVING)


def test_too_many_items_is_resource_exhausted(stub: encoder_pb2_grpc.EncoderServiceStub) -> None:
    with pytest.raises(grpc.RpcError) as info:
        stub.EncodeImages(images(*[(f"{i}.png", b"x") for i in range(257)]), timeout=30)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    details = info.value.details() or ""
    assert "257 images" in details and "the limit is 256" in details
    with pytest.raises(grpc.RpcError) as info:
        stub.EncodeTexts(encoder_pb2.EncodeTextsRequest(texts=["hello"] * 257), timeout=30)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_encode_texts(stub: encoder_pb2_grpc.EncoderServiceStub) -> None:
    texts = ["a photo of a cat", "", "a cat", "x" * 2001, "a truck"]
    resp = stub.EncodeTexts(encoder_pb2.EncodeTextsRequest(texts=texts), timeout=30)
    info = stub.GetModelInfo(encoder_pb2.GetModelInfoRequest(), timeout=10)
    assert resp.model_version == info.text_model_version
    assert [r.WhichOneof("result") for r in resp.results] == ["embedding", "error", "embedding", "error", "embedding"]
    assert resp.results[1].error.code == INVALID_ARGUMENT and "text 1" in resp.results[1].error.message
    assert "2001 characters" in resp.results[3].error.message
    vecs = {i: from_vector(resp.results[i].embedding) for i in (0, 2, 4)}
    for v in vecs.values():
        assert v.shape == (384,) and abs(np.linalg.norm(v) - 1.0) < 1e-5
    assert vecs[0] @ vecs[2] > vecs[0] @ vecs[4]


def test_get_model_info(stub: encoder_pb2_grpc.EncoderServiceStub) -> None:
    info = stub.GetModelInfo(encoder_pb2.GetModelInfoRequest(), timeout=10)
    assert info.image_model == "efficientnet-lite0" and info.image_model_version.startswith("efficientnet-lite0@")
    assert (info.image_size, info.feature_dim, info.text_dim) == (224, 1280, 384)
    assert len(info.class_labels) == 1000 and info.class_labels[281] == "tabby cat"
    assert info.text_model == "all-MiniLM-L6-v2"
    assert "CPUExecutionProvider" in info.providers


def test_expired_deadline_is_deadline_exceeded_and_not_run(
    server: ServiceProcess, stub: encoder_pb2_grpc.EncoderServiceStub, sample_photos: dict[str, bytes]
) -> None:
    before = scrape(server)
    with pytest.raises(grpc.RpcError) as info:
        stub.EncodeImages(images(*[("hubble.jpg", sample_photos["hubble"])] * 32), timeout=0.01)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    ok = stub.EncodeTexts(encoder_pb2.EncodeTextsRequest(texts=["still serving"]), timeout=30)
    assert ok.results[0].HasField("embedding")
    # The abandoned images never reached the model: no image batch ran after the deadline.
    time.sleep(0.5)
    after = scrape(server)
    assert sample(after, "imgsearch_encoder_items_total", kind="image") == sample(
        before, "imgsearch_encoder_items_total", kind="image"
    )


def test_metrics_show_rpcs_and_encoder_work(
    server: ServiceProcess, stub: encoder_pb2_grpc.EncoderServiceStub, sample_photos: dict[str, bytes]
) -> None:
    before = scrape(server)
    stub.EncodeImages(images(("cat", sample_photos["cat"]), ("bad", b"nope" * 10), ("horse", sample_photos["horse"])))
    stub.EncodeTexts(encoder_pb2.EncodeTextsRequest(texts=["a", "b", "c"]))
    after = scrape(server)

    def grew(name: str, by: float, **labels: str) -> None:
        delta = sample(after, name, **labels) - sample(before, name, **labels)
        assert delta == pytest.approx(by), f"{name}{labels} grew by {delta}, expected {by}"

    grew("grpc_server_handled_total", 1, grpc_service=SERVICE, grpc_method="EncodeImages", grpc_code="OK")
    grew("grpc_server_handled_total", 1, grpc_service=SERVICE, grpc_method="EncodeTexts", grpc_code="OK")
    grew("imgsearch_encoder_items_total", 2, kind="image")
    grew("imgsearch_encoder_items_total", 3, kind="text")
    grew("imgsearch_encoder_decode_failures_total", 1, reason="corrupt")
    grew("imgsearch_encoder_batch_size_sum", 2, kind="image")
    assert sample(after, "imgsearch_encoder_queue_seconds_count", kind="image") >= 2
    assert sample(after, "imgsearch_encoder_inference_seconds_count", kind="text") >= 1
    assert sample(after, "imgsearch_encoder_provider_info", provider="CPUExecutionProvider") == 1
    # Series exist before they are first used, so rate() and alerts work from the start.
    assert ("imgsearch_encoder_decode_failures_total", frozenset({("reason", "unsupported_format")})) in after
    assert sample(after, "imgsearch_service_ready", service="encoder") == 1


def test_reflection_lists_the_service(channel: grpc.Channel) -> None:
    db = ProtoReflectionDescriptorDatabase(channel)
    assert SERVICE in db.get_services()
    proto = db.FindFileContainingSymbol(SERVICE)
    assert proto.package == "imgsearch.encoder.v1"


def test_sigterm_drains_in_flight_calls_then_exits_0(tmp_path: Path, sample_photos: dict[str, bytes]) -> None:
    proc = ServiceProcess("encoder", log_path=tmp_path / "encoder.log").start()
    try:
        with grpc.insecure_channel(proc.address, options=[("grpc.max_receive_message_length", 64 << 20)]) as ch:
            stub = encoder_pb2_grpc.EncoderServiceStub(ch)
            call = stub.EncodeImages.future(images(*[("hubble.jpg", sample_photos["hubble"])] * 48), timeout=120)
            deadline = time.monotonic() + 30
            while sample(scrape(proc), "grpc_server_in_flight", grpc_method="EncodeImages") < 1:
                assert time.monotonic() < deadline, "the call never started"
                assert not call.done(), "the call finished before SIGTERM could be sent; make it bigger"
                time.sleep(0.02)
            code = proc.stop(timeout=60)
            resp = call.result(timeout=60)
    finally:
        proc.kill()
    assert code == 0, proc.log_tail()
    assert len(resp.results) == 48 and all(r.HasField("encoding") for r in resp.results)
    log = proc.log_tail(100_000)
    assert "draining" in log and "stopped" in log


@pytest.mark.parametrize(
    ("variable", "value", "shown"),
    [
        ("IMGSEARCH_ENCODER_PORT", "abc", "valid integer"),
        ("IMGSEARCH_ENCODER_MAX_BATCH", "0", "greater than or equal to 1"),
        ("IMGSEARCH_ENCODER_MODEL_DIR", "/nonexistent/models", "no manifest.json"),
    ],
)
def test_invalid_configuration_exits_non_zero_naming_the_variable(
    tmp_path: Path, variable: str, value: str, shown: str
) -> None:
    proc = ServiceProcess("encoder", env={variable: value}, log_path=tmp_path / "encoder.log")
    proc.start(wait=False)
    assert proc.proc is not None
    code = proc.proc.wait(timeout=60)
    assert code != 0
    log = proc.log_tail()
    assert variable in log and shown in log, log


def test_unusable_providers_fail_startup_clearly(tmp_path: Path) -> None:
    proc = ServiceProcess(
        "encoder", env={"IMGSEARCH_ENCODER_PROVIDERS": "MIGraphXExecutionProvider"}, log_path=tmp_path / "e.log"
    )
    proc.start(wait=False)
    assert proc.proc is not None
    assert proc.proc.wait(timeout=60) == 1
    assert "none of the configured execution providers" in proc.log_tail()
