"""A real tagger writer and read replica (and encoder) as subprocesses: read-your-writes, writer crash, catch-up."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2

from imgsearch.api.common.v1 import common_pb2
from imgsearch.api.encoder.v1 import encoder_pb2, encoder_pb2_grpc
from imgsearch.api.tagger.v1 import tagger_pb2, tagger_pb2_grpc
from tests.harness import ROOT, ServiceProcess, health_status


@pytest.fixture(scope="module")
def encoder(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    log = tmp_path_factory.mktemp("encoder") / "encoder.log"
    proc = ServiceProcess("encoder", env={"IMGSEARCH_ENCODER_MAX_WAIT_MS": "2"}, log_path=log).start()
    yield proc
    proc.stop()


def tagger_env(encoder: ServiceProcess, data: Path, **extra: str) -> dict[str, str]:
    env = {
        "IMGSEARCH_TAGGER_ENCODER_ADDRESS": encoder.address,
        "IMGSEARCH_TAGGER_DATA_DIR": str(data),
        "IMGSEARCH_TAGGER_HEADS_DIR": str(ROOT / "heads"),
    }
    env.update({f"IMGSEARCH_TAGGER_{k.upper()}": v for k, v in extra.items()})
    return env


@pytest.fixture()
def channels() -> Iterator[list[grpc.Channel]]:
    opened: list[grpc.Channel] = []
    yield opened
    for ch in opened:
        ch.close()


def stub(address: str, channels: list[grpc.Channel]) -> tagger_pb2_grpc.TaggerServiceStub:
    channels.append(grpc.insecure_channel(address))
    return tagger_pb2_grpc.TaggerServiceStub(channels[-1])


def cat_signal(encoder: ServiceProcess, photo: bytes) -> tagger_pb2.ImageSignal:
    with grpc.insecure_channel(encoder.address) as ch:
        resp = encoder_pb2_grpc.EncoderServiceStub(ch).EncodeImages(
            encoder_pb2.EncodeImagesRequest(
                images=[encoder_pb2.ImageInput(name="cat", data=photo)], include_logits=True
            ),
            timeout=60,
        )
    enc = resp.results[0].encoding
    return tagger_pb2.ImageSignal(features=enc.features, logits=enc.logits)


def unseen(
    tagger: tagger_pb2_grpc.TaggerServiceStub, image: tagger_pb2.ImageSignal, min_version: int = 0
) -> tagger_pb2.RankTagsResponse:
    """Every unseen (added) tag ranked for the image, under ConSE."""
    return tagger.RankTags(
        tagger_pb2.RankTagsRequest(
            image=image,
            top_k=1_000_000,
            filter=common_pb2.TAG_FILTER_UNSEEN,
            head="conse",
            min_vocabulary_version=min_version,
        ),
        timeout=10,
    )


def test_replica_reads_its_writes_survives_a_writer_crash_and_catches_up(
    encoder: ServiceProcess, tmp_path: Path, sample_photos: dict[str, bytes], channels: list[grpc.Channel]
) -> None:
    writer = ServiceProcess("tagger", env=tagger_env(encoder, tmp_path / "writer"), log_path=tmp_path / "writer.log")
    reader = ServiceProcess(
        "tagger",
        env=tagger_env(encoder, tmp_path / "unused", role="reader", writer_address="127.0.0.1:1"),
        log_path=tmp_path / "reader.log",
    )
    late = ServiceProcess(
        "tagger",
        env=tagger_env(encoder, tmp_path / "unused", role="reader", writer_address="127.0.0.1:1"),
        log_path=tmp_path / "late.log",
    )
    try:
        writer.start(timeout=180)
        reader.env["IMGSEARCH_TAGGER_WRITER_ADDRESS"] = writer.address
        reader.start(timeout=180)
        w, r = stub(writer.address, channels), stub(reader.address, channels)
        image = cat_signal(encoder, sample_photos["cat"])

        # Read-your-writes: the version AddTags returns, passed to the replica, makes it wait for the tag.
        added = w.AddTags(tagger_pb2.AddTagsRequest(tags=["feline"]), timeout=30)
        assert added.results[0].changed and added.vocabulary_version > 0
        ranked = unseen(r, image, added.vocabulary_version)
        assert ranked.vocabulary_version >= added.vocabulary_version
        assert [t.tag for t in ranked.tags] == ["feline"] and ranked.head == "conse@1"
        default = r.RankTags(tagger_pb2.RankTagsRequest(image=image, top_k=5), timeout=10)
        assert default.head.startswith("default@") and "cat" in [t.tag for t in default.tags], default
        with pytest.raises(grpc.RpcError) as err:
            r.AddTags(tagger_pb2.AddTagsRequest(tags=["nope"]), timeout=10)
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "read replica" in str(err.value.details())
        with pytest.raises(grpc.RpcError) as err:
            w.ProjectImages(tagger_pb2.ProjectImagesRequest(images=[image]), timeout=10)
        assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED and "gateway" in str(err.value.details())

        # The writer crashes: the replica keeps tagging from its last snapshot.
        writer.kill()
        for _ in range(3):
            still = unseen(r, image)
            assert [t.tag for t in still.tags] == ["feline"]
            time.sleep(0.3)
        assert health_status(reader.address) == health_pb2.HealthCheckResponse.SERVING
        # A replica that never had a snapshot is not ready while the writer is down.
        late.env["IMGSEARCH_TAGGER_WRITER_ADDRESS"] = writer.address
        late.start(wait=False)
        time.sleep(3)
        assert health_status(late.address) != health_pb2.HealthCheckResponse.SERVING

        # The writer restarts on the same data: the version is durable, and the replicas catch up.
        writer.start(timeout=180)
        later = w.AddTags(tagger_pb2.AddTagsRequest(tags=["kitten toy"]), timeout=30)
        assert later.vocabulary_version == added.vocabulary_version + 1
        deadline = time.monotonic() + 30
        while (ranked := unseen(r, image, later.vocabulary_version)).vocabulary_version < later.vocabulary_version:
            assert time.monotonic() < deadline, f"replica did not catch up; log: {reader.log_tail()}"
        assert sorted(t.tag for t in ranked.tags) == ["feline", "kitten toy"]
        late.wait_serving(timeout=120)
        assert sorted(t.tag for t in unseen(stub(late.address, channels), image, later.vocabulary_version).tags) == [
            "feline",
            "kitten toy",
        ]

        # SIGTERM with two replicas attached: the drain ends their change feeds at once instead of
        # waiting out the grace period (10 s) for streams that never end by themselves.
        started = time.monotonic()
        assert writer.stop(timeout=30) == 0
        assert time.monotonic() - started < 8, "the writer's drain waited for the replicas' streams"
        assert [t.tag for t in unseen(r, image).tags], "replicas keep tagging after the writer left"
    finally:
        for proc in (late, reader, writer):
            proc.stop()
