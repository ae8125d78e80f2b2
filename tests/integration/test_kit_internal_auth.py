"""A real index server with the internal token: direct calls without it are refused, health stays open."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from imgsearch.api.index.v1 import index_pb2, index_pb2_grpc
from tests.harness import ServiceProcess
from tests.integration.test_index_server import make_record, start

TOKEN = "internal-7b1e-current"
PREVIOUS = "internal-0c44-previous"


@pytest.fixture(scope="module")
def index(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    work = tmp_path_factory.mktemp("internal-auth")
    tokens = work / "internal-token"
    # Mid-rotation: the new token first (what this deployment sends), the previous one still accepted.
    tokens.write_text(f"{TOKEN}\n{PREVIOUS}\n")
    proc = start(work, "index", internal_token_file=str(tokens))
    try:
        yield proc
    finally:
        proc.stop()


def upsert(proc: ServiceProcess, metadata: tuple[tuple[str, str], ...]) -> index_pb2.UpsertResponse:
    record = make_record(np.random.default_rng(7), "auth-1")
    with grpc.insecure_channel(proc.address) as ch:
        stub = index_pb2_grpc.IndexServiceStub(ch)
        response: index_pb2.UpsertResponse = stub.Upsert(
            index_pb2.UpsertRequest(records=[record]), timeout=30, metadata=metadata
        )
        return response


def log_lines(proc: ServiceProcess) -> list[dict[str, object]]:
    assert proc.log_path is not None
    out = []
    for line in proc.log_path.read_text().splitlines():
        if line.startswith("{"):
            out.append(json.loads(line))
    return out


@pytest.mark.parametrize(
    "metadata",
    [
        pytest.param((), id="no-credentials"),
        pytest.param((("authorization", "Bearer not-the-token"),), id="wrong-token"),
        pytest.param((("authorization", f"Basic {TOKEN}"),), id="wrong-scheme"),
    ],
)
def test_upsert_without_the_internal_token_is_unauthenticated(
    index: ServiceProcess, metadata: tuple[tuple[str, str], ...]
) -> None:
    with pytest.raises(grpc.RpcError) as err:
        upsert(index, metadata)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED  # type: ignore[attr-defined]
    assert err.value.details() == "missing or wrong internal credentials"  # type: ignore[attr-defined]


def test_upsert_with_either_listed_token_is_accepted(index: ServiceProcess) -> None:
    for token in (TOKEN, PREVIOUS):
        response = upsert(index, (("authorization", f"Bearer {token}"),))
        assert [r.HasField("error") for r in response.results] == [False]


def test_health_needs_no_token(index: ServiceProcess) -> None:
    with grpc.insecure_channel(index.address) as ch:
        status = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5).status
    assert status == health_pb2.HealthCheckResponse.SERVING


def test_refusals_are_logged_once_at_info_without_secrets(index: ServiceProcess) -> None:
    with pytest.raises(grpc.RpcError):
        upsert(index, (("authorization", "Bearer leaked-guess"),))
    text = Path(str(index.log_path)).read_text()
    assert TOKEN not in text and PREVIOUS not in text and "leaked-guess" not in text
    refused = [
        line
        for line in log_lines(index)
        if line.get("grpc_code") == "UNAUTHENTICATED" and str(line.get("grpc_method", "")).endswith("/Upsert")
    ]
    assert refused, "no access line for the refused calls"
    assert {line["level"] for line in refused} == {"INFO"}
    assert not any("exc" in line for line in refused)
