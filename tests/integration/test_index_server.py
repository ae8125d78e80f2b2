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

from imgsearch.api.common.v1 import common_pb2
from imgsearch.api.index.v1 import index_pb2, index_pb2_grpc
from tests.harness import ServiceProcess

VD, SD = 1280, 384
HEAD = "minilm-proj@1"
NEW_HEAD = "minilm-proj@2"
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


def with_signals(rng: np.random.Generator, record: index_pb2.Record) -> index_pb2.Record:
    """The record with a raw-feature norm and its top 32 logits, as the gateway sends them."""
    logits = np.sort(rng.normal(size=32).astype(np.float32) * 4)[::-1]
    classes = rng.choice(1000, size=32, replace=False)
    record.feature_norm = float(rng.uniform(5, 50))
    record.top_logits.extend(
        index_pb2.ClassLogit(class_index=int(c), logit=float(v)) for c, v in zip(classes, logits, strict=True)
    )
    return record


def signals_of(record: index_pb2.Record) -> tuple[float, list[tuple[int, float]]]:
    return record.feature_norm, [(c.class_index, c.logit) for c in record.top_logits]


def scan_all(stub: index_pb2_grpc.IndexServiceStub, page_size: int, skip: str = "") -> list[index_pb2.Record]:
    out: list[index_pb2.Record] = []
    token = ""
    while True:
        resp = stub.Scan(
            index_pb2.ScanRequest(page_size=page_size, page_token=token, skip_semantic_head=skip), timeout=30
        )
        assert len(resp.records) <= page_size
        out.extend(resp.records)
        token = resp.next_page_token
        if not token:
            return out


def semantic_top(pool: dict[str, np.ndarray], q: np.ndarray, k: int) -> list[tuple[str, float]]:
    ids = list(pool)
    scores = np.stack([pool[i] for i in ids]) @ unit(q)
    return [(ids[j], float(scores[j])) for j in np.argsort(-scores)[:k]]


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
    np.testing.assert_allclose(get.records[0].visual.values, model.visual["rt3"], atol=2e-3)
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
    assert (stats.shard, stats.visual_dim, stats.semantic_dim, stats.index_type) == (SHARD, VD, SD, "SQfp16")
    assert stats.count >= 59
    assert stats.semantic_heads[HEAD] == stats.count
    assert stats.wal_entries >= 61


def test_search_batch_answers_each_search_as_search_alone_and_a_bad_one_fails_alone(
    stub: index_pb2_grpc.IndexServiceStub,
) -> None:
    rng = np.random.default_rng(11)
    records = [make_record(rng, f"sb{i}") for i in range(40)]
    for i, r in enumerate(records):
        r.metadata["album"] = "even" if i % 2 == 0 else "odd"
    upsert_all(stub, records)
    searches = []
    for i in range(6):
        space, dim = ((common_pb2.SPACE_VISUAL, VD), (common_pb2.SPACE_SEMANTIC, SD))[i % 2]
        req = index_pb2.SearchRequest(space=space, query=vector(rng.normal(size=dim)), k=5, semantic_head=HEAD)
        if i == 2:
            req.filter.terms.add(key="album", values=["even"])
        if i == 3:
            req.min_score = 0.0
            req.exclude_ids.append("sb0")
        searches.append(req)
    first = stub.Search(searches[4], timeout=10)
    searches[4].after.CopyFrom(index_pb2.SearchCursor(score=first.hits[-1].score, id=first.hits[-1].id))
    bad = index_pb2.SearchRequest(space=common_pb2.SPACE_VISUAL, query=vector(rng.normal(size=7)), k=5)
    batch = [*searches[:3], bad, *searches[3:]]

    got = stub.SearchBatch(index_pb2.SearchBatchRequest(searches=batch), timeout=30)

    assert got.shard == SHARD
    assert len(got.results) == len(batch)
    assert got.results[3].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "7" in got.results[3].error.message and "1280" in got.results[3].error.message
    alone = [stub.Search(r, timeout=10) for r in searches]
    answered = [r for i, r in enumerate(got.results) if i != 3]
    assert all(not r.HasField("error") for r in answered)
    for one, item in zip(alone, answered, strict=True):
        assert [(h.id, h.score) for h in item.response.hits] == [(h.id, h.score) for h in one.hits]
        assert item.response.searched == one.searched
    assert {h.metadata["album"] for h in answered[2].response.hits} == {"even"}
    assert len(answered[2].response.hits) == 5
    assert not {h.id for h in answered[4].response.hits} & {h.id for h in first.hits}

    too_many = index_pb2.SearchBatchRequest(searches=[searches[1]] * 1001)
    code, message = _status(lambda: stub.SearchBatch(too_many, timeout=30))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "1001 searches" in message and "1000" in message


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
    # A head the shard holds no vectors of is an empty space, never answered from another head's vectors.
    empty = search(space=common_pb2.SPACE_SEMANTIC, query=vector(rng.normal(size=SD)), semantic_head="other@2")
    assert (list(empty.hits), empty.searched) == ([], 0)

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


def test_scan_and_set_semantic(server: ServiceProcess, stub: index_pb2_grpc.IndexServiceStub) -> None:
    rng = np.random.default_rng(7)
    model = Model()
    records = [with_signals(rng, make_record(rng, f"rp{i}", model)) for i in range(25)]
    upsert_all(stub, records)
    sent = {r.id: r for r in records}
    got = stub.Get(index_pb2.GetRequest(ids=["rp0"], include_vectors=True), timeout=10).records[0]
    assert signals_of(got) == signals_of(sent["rp0"])
    assert len(got.top_logits) == 32

    # Every record once, in a stable order, with vectors and signals; the shard also holds other tests' records.
    scanned = scan_all(stub, 7)
    ids = [r.id for r in scanned]
    assert len(ids) == len(set(ids)) == stub.Stats(index_pb2.StatsRequest(), timeout=10).count
    assert [r.id for r in scan_all(stub, 1000)] == ids
    assert len(stub.Scan(index_pb2.ScanRequest(), timeout=10).records) == min(100, len(ids))
    ours = {r.id: r for r in scanned if r.id in sent}
    assert set(ours) == set(sent)
    for id_, r in ours.items():
        assert signals_of(r) == signals_of(sent[id_])
        assert (r.semantic_head, dict(r.metadata), r.source_name) == (HEAD, model.meta[id_], f"/photos/{id_}.jpg")
        assert r.created_unix_ms > 0
        np.testing.assert_allclose(r.visual.values, model.visual[id_], atol=2e-3)
        np.testing.assert_allclose(r.semantic.values, model.semantic[id_], atol=2e-3)

    moved = {f"rp{i}": rng.normal(size=SD).astype(np.float32) for i in range(10)}
    updates = [index_pb2.SemanticUpdate(id=i, semantic=vector(v), semantic_head=NEW_HEAD) for i, v in moved.items()]
    ghost = index_pb2.SemanticUpdate(id="rp-ghost", semantic=vector(np.ones(SD)), semantic_head=NEW_HEAD)
    short = index_pb2.SemanticUpdate(id="rp20", semantic=vector(np.ones(3)), semantic_head=NEW_HEAD)
    resp = stub.SetSemantic(
        index_pb2.SetSemanticRequest(updates=[*updates[:3], ghost, short, *updates[3:]]), timeout=10
    )
    assert [(r.id, r.changed, r.error.code) for r in resp.results] == [
        *[(u.id, True, 0) for u in updates[:3]],
        ("rp-ghost", False, grpc.StatusCode.NOT_FOUND.value[0]),
        ("rp20", False, grpc.StatusCode.INVALID_ARGUMENT.value[0]),
        *[(u.id, True, 0) for u in updates[3:]],
    ]
    assert resp.results[4].error.message == f"update 4 ('rp20'): semantic vector has 3 values, expected {SD}"

    new_pool = {i: unit(v) for i, v in moved.items()}
    for _ in range(3):
        q = rng.normal(size=SD).astype(np.float32)
        hits = stub.Search(
            index_pb2.SearchRequest(space=common_pb2.SPACE_SEMANTIC, query=vector(q), k=5, semantic_head=NEW_HEAD),
            timeout=10,
        ).hits
        want = semantic_top(new_pool, q, 5)
        assert [h.id for h in hits] == [i for i, _ in want]
        np.testing.assert_allclose([h.score for h in hits], [s for _, s in want], atol=2e-3)
    stats = stub.Stats(index_pb2.StatsRequest(), timeout=10)
    # The new head's vector is added next to the old one's.
    assert dict(stats.semantic_heads) == {HEAD: stats.count, NEW_HEAD: 10}
    after = stub.Get(index_pb2.GetRequest(ids=list(moved), include_vectors=True), timeout=10).records
    for r in after:
        assert [s.head for s in r.semantics] == [HEAD, NEW_HEAD]
        np.testing.assert_allclose(r.semantics[0].vector.values, model.semantic[r.id], atol=2e-3)
        np.testing.assert_allclose(r.semantics[1].vector.values, new_pool[r.id], atol=2e-3)
        # Legacy readers: without a head configuration, the first head by name.
        assert r.semantic_head == HEAD
        np.testing.assert_allclose(r.semantic.values, model.semantic[r.id], atol=2e-3)
        np.testing.assert_allclose(r.visual.values, model.visual[r.id], atol=2e-3)
        assert signals_of(r) == signals_of(sent[r.id])
        assert dict(r.metadata) == model.meta[r.id]
    # Resuming a re-projection: the records already moved are not scanned again.
    remaining = [r.id for r in scan_all(stub, 9, skip=NEW_HEAD)]
    assert sorted(remaining) == sorted(set(ids) - set(moved))

    assert _status(lambda: stub.Scan(index_pb2.ScanRequest(page_size=1001), timeout=10)) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "page_size must be between 1 and 1000, got 1001",
    )
    code, details = _status(lambda: stub.Scan(index_pb2.ScanRequest(page_token="12.0123456789abcdef"), timeout=10))
    assert (code, details.startswith("page_token was not issued by this shard")) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        True,
    )
    too_many = index_pb2.SetSemanticRequest(updates=[updates[0]] * 1001)
    assert _status(lambda: stub.SetSemantic(too_many, timeout=30)) == (
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "1001 updates in one request, at most 1000 allowed; split the request",
    )
    bad_logits = make_record(rng, "rp-bad-logits")
    bad_logits.top_logits.append(index_pb2.ClassLogit(class_index=10_000, logit=1.0))
    bad = stub.Upsert(index_pb2.UpsertRequest(records=[bad_logits]), timeout=10).results[0]
    assert bad.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "class_index 10000, expected 0..9999" in bad.error.message
    text = metrics_text(server)
    assert (metric(text, "imgsearch_index_writes_total", shard=SHARD, op="set_semantic") or 0) >= 10

    # Back to the one head (an upsert replaces every head's vector), so the module's shard stays as it was.
    upsert_all(stub, [sent[i] for i in moved])
    assert list(stub.Stats(index_pb2.StatsRequest(), timeout=10).semantic_heads) == [HEAD]


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
            np.testing.assert_allclose(r.visual.values, model.visual[r.id], atol=2e-3)
            np.testing.assert_allclose(r.semantic.values, model.semantic[r.id], atol=2e-3)
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


def test_sigkill_right_after_set_semantic_loses_nothing(tmp_path: Path) -> None:
    # The upsert below triggers a snapshot; the SetSemantic after it is only in SQLite when the process dies.
    proc = start(tmp_path, "kill-semantic", snapshot_every="50")
    rng = np.random.default_rng(8)
    model = Model()
    records = [with_signals(rng, make_record(rng, f"s{i}", model)) for i in range(60)]
    channel, stub = stub_for(proc)
    try:
        upsert_all(stub, records)
        deadline = time.monotonic() + 30
        while stub.Stats(index_pb2.StatsRequest(), timeout=10).wal_entries and time.monotonic() < deadline:
            time.sleep(0.05)
        assert stub.Stats(index_pb2.StatsRequest(), timeout=10).last_snapshot_unix_ms > 0
        moved = {f"s{i}": unit(rng.normal(size=SD).astype(np.float32)) for i in range(0, 60, 2)}
        updates = [index_pb2.SemanticUpdate(id=i, semantic=vector(v), semantic_head=NEW_HEAD) for i, v in moved.items()]
        resp = stub.SetSemantic(index_pb2.SetSemanticRequest(updates=updates), timeout=10)
        assert all(r.changed and not r.HasField("error") for r in resp.results)
        written_ms = stub.GetHeadState(index_pb2.GetHeadStateRequest(), timeout=10).last_semantic_write_unix_ms
        assert written_ms > 0
    finally:
        channel.close()
    proc.kill()

    proc.start(timeout=60)
    channel, stub = stub_for(proc)
    try:
        got = stub.Get(index_pb2.GetRequest(ids=[r.id for r in records], include_vectors=True), timeout=30)
        assert list(got.missing_ids) == []
        sent = {r.id: r for r in records}
        for r in got.records:
            expected = {HEAD: model.semantic[r.id], **({NEW_HEAD: moved[r.id]} if r.id in moved else {})}
            assert [s.head for s in r.semantics] == sorted(expected)
            for s in r.semantics:
                np.testing.assert_allclose(s.vector.values, expected[s.head], atol=2e-3)
            np.testing.assert_allclose(r.visual.values, model.visual[r.id], atol=2e-3)
            assert signals_of(r) == signals_of(sent[r.id])
            assert dict(r.metadata) == model.meta[r.id]
        assert dict(stub.Stats(index_pb2.StatsRequest(), timeout=10).semantic_heads) == {HEAD: 60, NEW_HEAD: 30}
        state = stub.GetHeadState(index_pb2.GetHeadStateRequest(), timeout=10)
        assert state.last_semantic_write_unix_ms == written_ms
        pools = {HEAD: model.semantic, NEW_HEAD: moved}
        for head, pool in pools.items():
            q = rng.normal(size=SD).astype(np.float32)
            hits = stub.Search(
                index_pb2.SearchRequest(space=common_pb2.SPACE_SEMANTIC, query=vector(q), k=10, semantic_head=head),
                timeout=10,
            ).hits
            want = semantic_top(pool, q, 10)
            assert [h.id for h in hits] == [i for i, _ in want]
            np.testing.assert_allclose([h.score for h in hits], [s for _, s in want], atol=2e-3)
    finally:
        channel.close()
        assert proc.stop() == 0
    loaded = [json.loads(line) for line in proc.log_tail(100_000).splitlines() if '"shard loaded"' in line]
    assert [(entry["mode"], entry["replayed_changes"]) for entry in loaded] == [("empty", 0), ("snapshot", 30)]


def test_head_config_is_durable_and_enforced_across_sigkill(tmp_path: Path) -> None:
    proc = start(tmp_path, "kill-config")
    rng = np.random.default_rng(9)
    model = Model()
    records = [make_record(rng, f"h{i}", model) for i in range(20)]
    channel, stub = stub_for(proc)

    def set_config(epoch: int, active: str, building: str = "") -> index_pb2.SetHeadConfigResponse:
        config = index_pb2.HeadConfig(epoch=epoch, active=active, building=building)
        return stub.SetHeadConfig(index_pb2.SetHeadConfigRequest(config=config), timeout=10)

    try:
        fresh = stub.GetHeadState(index_pb2.GetHeadStateRequest(), timeout=10)
        assert (fresh.config.epoch, fresh.config.active, fresh.config.building, fresh.records) == (0, "", "", 0)
        assert (fresh.shard, dict(fresh.vectors_per_head), fresh.last_semantic_write_unix_ms) == (SHARD, {}, 0)
        upsert_all(stub, records)
        assert _status(lambda: set_config(4, "")) == (
            grpc.StatusCode.INVALID_ARGUMENT,
            "head configuration epoch 4 has no active head; name the head queries use (name@version)",
        )
        won = set_config(5, HEAD, NEW_HEAD)
        assert (won.config.epoch, won.config.active, won.config.building, won.records) == (5, HEAD, NEW_HEAD, 20)
        # The building head is incomplete: no record has its vector yet.
        assert dict(won.vectors_per_head) == {HEAD: 20, NEW_HEAD: 0}
        # An older epoch loses without an error; the response shows the configuration in force.
        lost = set_config(4, "stale@1")
        assert (lost.config.epoch, lost.config.active, lost.config.building) == (5, HEAD, NEW_HEAD)
    finally:
        channel.close()
    proc.kill()

    proc.start(timeout=60)
    channel, stub = stub_for(proc)
    try:
        state = stub.GetHeadState(index_pb2.GetHeadStateRequest(), timeout=10)
        assert (state.config.epoch, state.config.active, state.config.building) == (5, HEAD, NEW_HEAD)
        # Writers with a stale view (only the active head's vector) fail per record; a dual-written one goes in.
        stale = make_record(rng, "h-stale")
        dual = make_record(rng, "h-dual")
        dual.semantics.add(head=NEW_HEAD, vector=vector(rng.normal(size=SD)))
        resp = stub.Upsert(index_pb2.UpsertRequest(records=[stale, dual]), timeout=10)
        assert resp.results[0].error.code == grpc.StatusCode.FAILED_PRECONDITION.value[0]
        assert resp.results[0].error.message.startswith(
            f"record 0 ('h-stale') has no semantic vector for head '{NEW_HEAD}', which head configuration epoch 5 "
            "requires; the writer's head configuration is stale"
        )
        assert (resp.results[1].HasField("error"), resp.results[1].changed) == (False, True)
        # Backfill the rest; the building head is then complete and searchable.
        backfill = [
            index_pb2.SemanticUpdate(id=r.id, semantic=vector(rng.normal(size=SD)), semantic_head=NEW_HEAD)
            for r in records
        ]
        assert all(
            r.changed for r in stub.SetSemantic(index_pb2.SetSemanticRequest(updates=backfill), timeout=10).results
        )
        state = stub.GetHeadState(index_pb2.GetHeadStateRequest(), timeout=10)
        assert (state.records, dict(state.vectors_per_head)) == (21, {HEAD: 21, NEW_HEAD: 21})
        assert state.last_semantic_write_unix_ms > 0
        # Legacy readers see the active head's vector.
        got = stub.Get(index_pb2.GetRequest(ids=["h0"], include_vectors=True), timeout=10).records[0]
        assert got.semantic_head == HEAD
        np.testing.assert_allclose(got.semantic.values, model.semantic["h0"], atol=2e-3)
        flipped = set_config(6, NEW_HEAD)
        assert (flipped.config.epoch, flipped.config.active, dict(flipped.vectors_per_head)[NEW_HEAD]) == (
            6,
            NEW_HEAD,
            21,
        )
        # An empty semantic_head now searches the active head.
        q = rng.normal(size=SD).astype(np.float32)
        hits = stub.Search(
            index_pb2.SearchRequest(space=common_pb2.SPACE_SEMANTIC, query=vector(q), k=3), timeout=10
        ).hits
        top = stub.Search(
            index_pb2.SearchRequest(space=common_pb2.SPACE_SEMANTIC, query=vector(q), k=3, semantic_head=NEW_HEAD),
            timeout=10,
        ).hits
        assert [h.id for h in hits] == [h.id for h in top]
    finally:
        channel.close()
    proc.kill()
    proc.start(timeout=60)
    channel, stub = stub_for(proc)
    try:
        state = stub.GetHeadState(index_pb2.GetHeadStateRequest(), timeout=10)
        assert (state.config.epoch, state.config.active, state.config.building) == (6, NEW_HEAD, "")
    finally:
        channel.close()
        assert proc.stop() == 0


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
