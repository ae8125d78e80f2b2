"""The index server as a real process: gRPC contract, statuses, metrics, crash safety and graceful shutdown."""

from __future__ import annotations

import json
import re
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from imgsearch.common.v1 import common_pb2
from imgsearch.index.v1 import index_pb2, index_pb2_grpc
from tests.harness import ServiceProcess

VD, SD = 1280, 384
HEAD = "minilm-proj@1"
SHARD = "shard-it"


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x.astype(np.float64))


class Model:
    """The records a test wrote and got acknowledged, for brute-force ground truth."""

    def __init__(self) -> None:
        self.visual: dict[str, np.ndarray] = {}
        self.semantic: dict[str, np.ndarray] = {}
        self.meta: dict[str, dict[str, str]] = {}

    def top(self, space: int, q: np.ndarray, k: int, exclude: set[str] | None = None) -> list[str]:
        pool = self.visual if space == common_pb2.SPACE_VISUAL else self.semantic
        ids = [i for i in pool if not exclude or i not in exclude]
        scores = np.stack([pool[i] for i in ids]) @ unit(q)
        return [ids[j] for j in np.argsort(-scores)[:k]]


def make_record(rng: np.random.Generator, id_: str, model: Model | None = None) -> index_pb2.Record:
    v = rng.normal(size=VD).astype(np.float32)
    s = rng.normal(size=SD).astype(np.float32)
    meta = {"n": id_, "kind": "test"}
    if model is not None:
        model.visual[id_], model.semantic[id_], model.meta[id_] = unit(v), unit(s), meta
    return index_pb2.Record(
        id=id_,
        visual=common_pb2.FloatVector(values=v.tolist()),
        semantic=common_pb2.FloatVector(values=s.tolist()),
        semantic_head=HEAD,
        metadata=meta,
        source_name=f"/photos/{id_}.jpg",
    )


def vector(x: np.ndarray) -> common_pb2.FloatVector:
    return common_pb2.FloatVector(values=x.astype(np.float32).tolist())


def start(tmp_path: Path, name: str, **env: str) -> ServiceProcess:
    full = {
        "IMGSEARCH_INDEX_SHARD": SHARD,
        "IMGSEARCH_INDEX_DATA_DIR": str(tmp_path / "data"),
        "IMGSEARCH_INDEX_GRACE_SECONDS": "10",
        **{f"IMGSEARCH_INDEX_{k.upper()}": v for k, v in env.items()},
    }
    return ServiceProcess(service="index", env=full, log_path=tmp_path / f"{name}.log").start(timeout=60)


def stub_for(proc: ServiceProcess) -> tuple[grpc.Channel, index_pb2_grpc.IndexServiceStub]:
    channel = grpc.insecure_channel(
        proc.address,
        options=[("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20)],
    )
    return channel, index_pb2_grpc.IndexServiceStub(channel)


def upsert_all(stub: index_pb2_grpc.IndexServiceStub, records: list[index_pb2.Record]) -> None:
    resp = stub.Upsert(index_pb2.UpsertRequest(records=records), timeout=30)
    assert [r.HasField("error") for r in resp.results] == [False] * len(records)


def metrics_text(proc: ServiceProcess) -> str:
    with urllib.request.urlopen(proc.metrics_url, timeout=5) as resp:
        return str(resp.read().decode())


def metric(text: str, name: str, **labels: str) -> float | None:
    """The value of one sample whose labels include these."""
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', line.split(" ")[0]))
        if all(found.get(k) == v for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return None


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    proc = start(tmp_path_factory.mktemp("index"), "server")
    yield proc
    assert proc.stop() == 0, proc.log_tail()


@pytest.fixture(scope="module")
def stub(server: ServiceProcess) -> Iterator[index_pb2_grpc.IndexServiceStub]:
    channel, s = stub_for(server)
    yield s
    channel.close()


def test_health_is_serving_for_the_service(server: ServiceProcess) -> None:
    with grpc.insecure_channel(server.address) as ch:
        health = health_pb2_grpc.HealthStub(ch)
        for name in ("", "imgsearch.index.v1.IndexService"):
            resp = health.Check(health_pb2.HealthCheckRequest(service=name), timeout=5)
            assert resp.status == health_pb2.HealthCheckResponse.SERVING


def test_upsert_search_get_delete_stats(stub: index_pb2_grpc.IndexServiceStub) -> None:
    rng = np.random.default_rng(1)
    model = Model()
    records = [make_record(rng, f"rt{i}", model) for i in range(60)]
    bad = make_record(rng, "")
    resp = stub.Upsert(index_pb2.UpsertRequest(records=[*records[:30], bad, *records[30:]]), timeout=30)
    assert [r.changed for r in resp.results] == [True] * 30 + [False] + [True] * 30
    assert resp.results[30].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert resp.results[30].error.message == "record 30: id must not be empty"

    for space, dim in ((common_pb2.SPACE_VISUAL, VD), (common_pb2.SPACE_SEMANTIC, SD)):
        for _ in range(3):
            q = rng.normal(size=dim).astype(np.float32)
            got = stub.Search(
                index_pb2.SearchRequest(space=space, query=vector(q), k=7, semantic_head=HEAD), timeout=10
            )
            assert [h.id for h in got.hits] == model.top(space, q, 7)
            assert got.shard == SHARD
            assert got.searched == 60
            assert all(h.shard == SHARD for h in got.hits)
            assert dict(got.hits[0].metadata) == model.meta[got.hits[0].id]
            assert got.hits[0].source_name == f"/photos/{got.hits[0].id}.jpg"
            scores = [h.score for h in got.hits]
            assert scores == sorted(scores, reverse=True)

    # Search by an image's own vector, excluding itself.
    own = np.asarray(records[5].visual.values, np.float32)
    got = stub.Search(
        index_pb2.SearchRequest(space=common_pb2.SPACE_VISUAL, query=vector(own), k=5, exclude_ids=["rt5"]),
        timeout=10,
    )
    assert [h.id for h in got.hits] == model.top(common_pb2.SPACE_VISUAL, own, 5, exclude={"rt5"})

    get = stub.Get(index_pb2.GetRequest(ids=["rt3", "missing", "rt1"], include_vectors=True), timeout=10)
    assert [r.id for r in get.records] == ["rt3", "rt1"]
    assert list(get.missing_ids) == ["missing"]
    assert get.records[0].semantic_head == HEAD
    assert get.records[0].created_unix_ms > 0
    np.testing.assert_allclose(get.records[0].visual.values, model.visual["rt3"], atol=1e-6)
    plain = stub.Get(index_pb2.GetRequest(ids=["rt3"]), timeout=10)
    assert not plain.records[0].HasField("visual")

    deleted = stub.Delete(index_pb2.DeleteRequest(ids=["rt1", "nope", ""]), timeout=10)
    assert [(r.id, r.changed) for r in deleted.results] == [("rt1", True), ("nope", False), ("", False)]
    assert deleted.results[2].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    del model.visual["rt1"], model.semantic["rt1"]
    q = np.asarray(records[1].visual.values, np.float32)
    got = stub.Search(index_pb2.SearchRequest(space=common_pb2.SPACE_VISUAL, query=vector(q), k=3), timeout=10)
    assert "rt1" not in [h.id for h in got.hits]
    assert [h.id for h in got.hits] == model.top(common_pb2.SPACE_VISUAL, q, 3)

    stats = stub.Stats(index_pb2.StatsRequest(), timeout=10)
    assert (stats.shard, stats.visual_dim, stats.semantic_dim, stats.index_type) == (SHARD, VD, SD, "Flat")
    assert stats.count >= 59
    assert stats.semantic_heads[HEAD] == stats.count
    assert stats.wal_entries >= 61


def _status(call: object) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        call()  # type: ignore[operator]
    err = info.value
    return err.code(), err.details() or ""  # type: ignore[attr-defined]


def test_bad_inputs_get_precise_statuses_and_the_server_keeps_serving(
    server: ServiceProcess, stub: index_pb2_grpc.IndexServiceStub
) -> None:
    rng = np.random.default_rng(2)
    upsert_all(stub, [make_record(rng, f"bad-input-{i}") for i in range(3)])
    q = vector(rng.normal(size=VD))

    def search(**kw: object) -> index_pb2.SearchResponse:
        args: dict[str, object] = {"space": common_pb2.SPACE_VISUAL, "query": q, "k": 5, **kw}
        return stub.Search(index_pb2.SearchRequest(**args), timeout=10)  # type: ignore[arg-type]

    assert _status(lambda: search(k=0)) == (grpc.StatusCode.INVALID_ARGUMENT, "k must be between 1 and 1000, got 0")
    assert _status(lambda: search(k=100000)) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "k must be between 1 and 1000, got 100000",
    )
    assert _status(lambda: search(query=vector(np.ones(3)))) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        f"query for the visual space has 3 values, expected {VD}",
    )
    assert _status(lambda: search(space=common_pb2.SPACE_SEMANTIC)) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        f"query for the semantic space has {VD} values, expected {SD}",
    )
    assert _status(lambda: search(space=common_pb2.SPACE_UNSPECIFIED)) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "space must be SPACE_VISUAL or SPACE_SEMANTIC, got SPACE_UNSPECIFIED",
    )
    assert _status(lambda: search(space=7)) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "space must be SPACE_VISUAL or SPACE_SEMANTIC, got 7",
    )
    assert _status(lambda: search(query=vector(np.zeros(VD))))[0] == grpc.StatusCode.INVALID_ARGUMENT
    code, details = _status(
        lambda: search(space=common_pb2.SPACE_SEMANTIC, query=vector(rng.normal(size=SD)), semantic_head="other@2")
    )
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    assert f"'{HEAD}'" in details
    assert "'other@2'" in details

    too_many = [make_record(rng, f"many{i}") for i in range(1001)]
    assert _status(lambda: stub.Upsert(index_pb2.UpsertRequest(records=too_many), timeout=30)) == (
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "1001 records in one request, at most 1000 allowed; split the request",
    )
    wrong_dims = make_record(rng, "wrong-dims")
    wrong_dims.visual.values.append(1.0)
    resp = stub.Upsert(index_pb2.UpsertRequest(records=[wrong_dims, make_record(rng, "right-dims")]), timeout=10)
    assert resp.results[0].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert resp.results[0].error.message == f"record 0 ('wrong-dims'): visual vector has {VD + 1} values, expected {VD}"
    assert not resp.results[1].HasField("error")
    assert list(stub.Get(index_pb2.GetRequest(ids=["wrong-dims", "many0"]), timeout=10).missing_ids) == [
        "wrong-dims",
        "many0",
    ]

    # Still serving, and still answering correctly.
    assert server.proc is not None and server.proc.poll() is None
    got = search(query=make_record(np.random.default_rng(2), "x").visual, k=1)
    assert got.hits[0].id == "bad-input-0"


def test_metrics_expose_the_index_state(server: ServiceProcess, stub: index_pb2_grpc.IndexServiceStub) -> None:
    rng = np.random.default_rng(3)
    upsert_all(stub, [make_record(rng, f"metrics{i}") for i in range(4)])
    stub.Delete(index_pb2.DeleteRequest(ids=["metrics0"]), timeout=10)
    stub.Search(index_pb2.SearchRequest(space=common_pb2.SPACE_VISUAL, query=vector(rng.normal(size=VD)), k=2))
    stats = stub.Stats(index_pb2.StatsRequest(), timeout=10)
    text = metrics_text(server)
    assert metric(text, "imgsearch_index_vectors", shard=SHARD, space="visual") == stats.count
    assert metric(text, "imgsearch_index_vectors", shard=SHARD, space="semantic") == stats.count
    assert metric(text, "imgsearch_index_wal_entries", shard=SHARD) == stats.wal_entries
    age = metric(text, "imgsearch_index_snapshot_age_seconds", shard=SHARD)
    assert age is not None and age >= 0
    searches = metric(text, "imgsearch_index_search_seconds_count", shard=SHARD, space="visual", index_type="Flat")
    assert searches is not None and searches >= 1
    assert (metric(text, "imgsearch_index_writes_total", shard=SHARD, op="upsert") or 0) >= 4
    assert (metric(text, "imgsearch_index_writes_total", shard=SHARD, op="delete") or 0) >= 1
    handled = metric(text, "grpc_server_handled_total", grpc_method="Upsert", grpc_code="OK")
    assert handled is not None and handled >= 1


def test_sigkill_right_after_acks_loses_nothing(tmp_path: Path) -> None:
    # A snapshot after 100 changes, so the restart loads a snapshot and replays what came after it.
    proc = start(tmp_path, "kill", snapshot_every="100")
    rng = np.random.default_rng(4)
    model = Model()
    channel, stub = stub_for(proc)
    try:
        for b in range(5):
            upsert_all(stub, [make_record(rng, f"k{b}-{i}", model) for i in range(25)])
        replaced = [make_record(rng, f"k0-{i}", model) for i in range(10)]
        upsert_all(stub, replaced)
        # 135 changes: wait for the background snapshot; the 18 changes below stay under the threshold.
        deadline = time.monotonic() + 30
        while stub.Stats(index_pb2.StatsRequest(), timeout=10).wal_entries >= 100 and time.monotonic() < deadline:
            time.sleep(0.05)
        gone = [f"k1-{i}" for i in range(15)]
        assert all(r.changed for r in stub.Delete(index_pb2.DeleteRequest(ids=gone), timeout=10).results)
        last = [make_record(rng, f"last{i}", model) for i in range(3)]
        upsert_all(stub, last)
        queries = [rng.normal(size=VD).astype(np.float32) for _ in range(4)]
        before = [
            [
                h.id
                for h in stub.Search(
                    index_pb2.SearchRequest(space=common_pb2.SPACE_VISUAL, query=vector(q), k=10), timeout=10
                ).hits
            ]
            for q in queries
        ]
    finally:
        channel.close()
    proc.kill()
    for i in gone:
        del model.visual[i], model.semantic[i], model.meta[i]

    proc.start(timeout=60)
    channel, stub = stub_for(proc)
    try:
        ids = [f"k{b}-{i}" for b in range(5) for i in range(25)] + [f"last{i}" for i in range(3)]
        got = stub.Get(index_pb2.GetRequest(ids=ids, include_vectors=True), timeout=30)
        assert sorted(got.missing_ids) == sorted(gone)
        assert {r.id for r in got.records} == set(model.visual)
        for r in got.records:
            assert dict(r.metadata) == model.meta[r.id]
            np.testing.assert_allclose(r.visual.values, model.visual[r.id], atol=1e-6)
            np.testing.assert_allclose(r.semantic.values, model.semantic[r.id], atol=1e-6)
        for q, want in zip(queries, before, strict=True):
            resp = stub.Search(
                index_pb2.SearchRequest(space=common_pb2.SPACE_VISUAL, query=vector(q), k=10), timeout=10
            )
            assert [h.id for h in resp.hits] == want == model.top(common_pb2.SPACE_VISUAL, q, 10)
        for _ in range(3):
            q = rng.normal(size=SD).astype(np.float32)
            resp = stub.Search(
                index_pb2.SearchRequest(space=common_pb2.SPACE_SEMANTIC, query=vector(q), k=10, semantic_head=HEAD),
                timeout=10,
            )
            assert [h.id for h in resp.hits] == model.top(common_pb2.SPACE_SEMANTIC, q, 10)
        stats = stub.Stats(index_pb2.StatsRequest(), timeout=10)
        assert stats.count == len(model.visual)
        assert stats.last_snapshot_unix_ms > 0
    finally:
        channel.close()
        assert proc.stop() == 0
    loaded = [json.loads(line) for line in proc.log_tail(100_000).splitlines() if '"shard loaded"' in line]
    assert [entry["mode"] for entry in loaded] == ["empty", "snapshot"]
    assert loaded[1]["replayed_changes"] > 0


def _in_flight_upserts(proc: ServiceProcess) -> float:
    return metric(metrics_text(proc), "grpc_server_in_flight", grpc_method="Upsert") or 0.0


def test_sigterm_drains_in_flight_writes_snapshots_and_exits_zero(tmp_path: Path) -> None:
    proc = start(tmp_path, "term")
    rng = np.random.default_rng(5)
    channel, stub = stub_for(proc)
    try:
        upsert_all(stub, [make_record(rng, f"t{i}") for i in range(50)])
        # SIGTERM while a large upsert is being handled: it must finish and be acknowledged.
        for attempt in range(5):
            batch = [make_record(rng, f"drain{attempt}-{i}") for i in range(1000)]
            future = stub.Upsert.future(index_pb2.UpsertRequest(records=batch), timeout=60)
            while not future.done() and _in_flight_upserts(proc) < 1:
                time.sleep(0.002)
            if not future.done():
                break
        else:
            pytest.fail("could not catch an upsert in flight")
        assert proc.proc is not None
        proc.proc.send_signal(15)
        resp = future.result()
        assert len(resp.results) == 1000
        assert not any(r.HasField("error") for r in resp.results)
        assert proc.proc.wait(30) == 0
    finally:
        channel.close()
    total = 50 + 1000 * (attempt + 1)
    newest = sorted((tmp_path / "data" / "snapshots").glob("snap-*"))
    assert len(newest) == 1
    manifest = json.loads((newest[0] / "manifest.json").read_text())
    assert manifest["seq"] == total
    assert manifest["indexes"][0]["count"] == total

    proc.start(timeout=60)
    channel, stub = stub_for(proc)
    try:
        stats = stub.Stats(index_pb2.StatsRequest(), timeout=10)
        assert stats.count == total
        assert stats.wal_entries == 0
        assert stats.last_snapshot_unix_ms == manifest["created_unix_ms"]
        found = stub.Get(index_pb2.GetRequest(ids=[f"drain{attempt}-{i}" for i in range(0, 1000, 100)]), timeout=10)
        assert len(found.records) == 10
    finally:
        channel.close()
        assert proc.stop() == 0
    loaded = [json.loads(line) for line in proc.log_tail(100_000).splitlines() if '"shard loaded"' in line]
    assert [(entry["mode"], entry["replayed_changes"]) for entry in loaded] == [("empty", 0), ("snapshot", 0)]


def test_invalid_configuration_exits_with_a_message(tmp_path: Path) -> None:
    proc = ServiceProcess(
        service="index",
        env={"IMGSEARCH_INDEX_SHARD": "../etc", "IMGSEARCH_INDEX_MAX_K": "0"},
        log_path=tmp_path / "bad.log",
    ).start(wait=False)
    assert proc.proc is not None
    assert proc.proc.wait(60) == 2
    log = proc.log_tail()
    assert "IMGSEARCH_INDEX_SHARD: String should match pattern" in log
    assert "IMGSEARCH_INDEX_MAX_K: Input should be greater than or equal to 1" in log


def test_changed_dimensions_refuse_to_start_and_keep_the_data(tmp_path: Path) -> None:
    proc = start(tmp_path, "dims")
    channel, stub = stub_for(proc)
    try:
        upsert_all(stub, [make_record(np.random.default_rng(6), "keep-me")])
    finally:
        channel.close()
    assert proc.stop() == 0
    bad = ServiceProcess(
        service="index",
        env={"IMGSEARCH_INDEX_DATA_DIR": str(tmp_path / "data"), "IMGSEARCH_INDEX_VISUAL_DIM": "512"},
        log_path=tmp_path / "dims-bad.log",
    ).start(wait=False)
    assert bad.proc is not None
    assert bad.proc.wait(60) == 1
    assert "was created with visual_dim=1280, but the settings say 512" in bad.log_tail()
    proc.start(timeout=60)
    channel, stub = stub_for(proc)
    try:
        assert [r.id for r in stub.Get(index_pb2.GetRequest(ids=["keep-me"]), timeout=10).records] == ["keep-me"]
    finally:
        channel.close()
        assert proc.stop() == 0
