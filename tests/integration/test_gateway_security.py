"""The real gateway at the edge: bearer tokens on writes (and reads when asked), TLS with a CA made here."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image

from imgsearch.client import GatewayClient, ImageToAdd
from tests.harness import ROOT, ServiceProcess, free_port_range
from tests.unit.test_tls import PKI, make_pki

pytestmark = pytest.mark.slow

TOKEN = "edge-token-7f3a"
OTHER_TOKEN = "second-client-token"


@dataclass
class Edge:
    """A running stack whose gateway requires tokens on writes, and a second, TLS-only gateway."""

    state_dir: Path
    doc: dict[str, Any]
    pki: PKI
    tls_gateway: ServiceProcess

    @property
    def gateway(self) -> str:
        return str(self.doc["gateway"])


def devstack(*args: str, env: dict[str, str] | None = None, timeout: float = 420) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "imgsearch.devstack", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        check=False,
    )


def wait_health(address: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with grpc.insecure_channel(address) as ch:
            try:
                resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=1)
                if resp.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
        time.sleep(0.2)
    raise TimeoutError(f"no SERVING health at {address}")


@pytest.fixture(scope="module")
def edge(tmp_path_factory: pytest.TempPathFactory, model_dir: Path) -> Iterator[Edge]:
    work = tmp_path_factory.mktemp("edge")
    tokens = work / "tokens"
    tokens.write_text(f"# one token per line, as mounted from the Secret\n{TOKEN}\n{OTHER_TOKEN}\n")
    pki = make_pki(work / "pki")
    state = work / "stack"
    env = {**os.environ, "IMGSEARCH_GATEWAY_AUTH_TOKENS_FILE": str(tokens)}
    up = devstack(
        "up",
        "--state-dir", str(state),
        "--port-base", str(free_port_range(20)),
        "--metrics-base", str(free_port_range(20)),
        "--no-gallery",
        env=env,
    )  # fmt: skip
    doc = json.loads((state / "stack.json").read_text()) if (state / "stack.json").exists() else {}
    tls_gateway: ServiceProcess | None = None
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        services = doc["services"]
        # A second gateway over the same backends, as the prod overlay runs it: TLS on its public port,
        # tokens on every call, and a plaintext health-only port for the kubelet's probes.
        health_port = free_port_range(1)
        tls_gateway = ServiceProcess(
            "gateway",
            env={
                "IMGSEARCH_GATEWAY_ENCODER_ADDRESS": services["encoder"]["address"],
                "IMGSEARCH_GATEWAY_TAGGER_ADDRESS": services["tagger"]["address"],
                "IMGSEARCH_GATEWAY_INDEX_SHARDS": ",".join(
                    f"{n}={services[n]['address']}" for n in sorted(services) if n.startswith("index-")
                ),
                "IMGSEARCH_GATEWAY_AUTH_TOKENS_FILE": str(tokens),
                "IMGSEARCH_GATEWAY_AUTH_READS": "true",
                "IMGSEARCH_GATEWAY_TLS_CERT_FILE": str(pki.server.cert),
                "IMGSEARCH_GATEWAY_TLS_KEY_FILE": str(pki.server.key),
                "IMGSEARCH_GATEWAY_HEALTH_PORT": str(health_port),
            },
            log_path=work / "tls-gateway.log",
        ).start(wait=False)
        wait_health(f"127.0.0.1:{health_port}")
        yield Edge(state, doc, pki, tls_gateway)
    finally:
        if tls_gateway is not None:
            tls_gateway.stop()
        devstack("down", "--state-dir", str(state), timeout=120)


def jpeg(sample: bytes) -> bytes:
    buf = io.BytesIO()
    Image.open(io.BytesIO(sample)).convert("RGB").save(buf, format="JPEG")
    return buf.getvalue()


def code_of(call: Callable[[], Any]) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as err:
        call()
    return err.value.code(), err.value.details() or ""  # type: ignore[attr-defined]


def test_writes_without_or_with_a_wrong_token_are_unauthenticated(edge: Edge, sample_photos: dict[str, bytes]) -> None:
    cat = ImageToAdd(jpeg(sample_photos["cat"]), "cat")
    with GatewayClient(edge.gateway, timeout=60) as anonymous:
        for call in (
            lambda: anonymous.add_images([cat]),
            lambda: anonymous.delete_images(["cat"]),
            lambda: anonymous.add_tags(["feline"]),
            lambda: anonymous.remove_tags(["feline"]),
            lambda: anonymous.activate_head("conse", reproject=False),
        ):
            code, details = code_of(call)
            assert code == grpc.StatusCode.UNAUTHENTICATED
            assert "authorization: Bearer <token>" in details
    with GatewayClient(edge.gateway, timeout=60, token=TOKEN + "-wrong") as wrong:
        code, details = code_of(lambda: wrong.add_images([cat]))
        assert code == grpc.StatusCode.UNAUTHENTICATED and "not valid" in details
        code, _ = code_of(lambda: wrong.add_tags(["feline"]))
        assert code == grpc.StatusCode.UNAUTHENTICATED


def test_writes_with_a_listed_token_work_and_reads_stay_open(edge: Edge, sample_photos: dict[str, bytes]) -> None:
    with GatewayClient(edge.gateway, timeout=120, token=TOKEN) as writer:
        outcomes = writer.add_images([ImageToAdd(jpeg(sample_photos[n]), n) for n in ("cat", "coffee", "rocket")])
        assert [o.ok for o in outcomes] == [True, True, True], outcomes
        assert writer.add_tags(["feline"])[0].ok
    with GatewayClient(edge.gateway, timeout=120, token=OTHER_TOKEN) as second:
        assert second.remove_tags(["feline"])[0].ok
    # Reads need no token on this gateway (IMGSEARCH_GATEWAY_AUTH_READS unset).
    with GatewayClient(edge.gateway, timeout=120) as reader:
        assert reader.search_image(jpeg(sample_photos["coffee"]), k=1).hits[0].id == "coffee"
        assert reader.search_text("a cat", k=3).hits
        assert reader.tag(sample_photos["cat"], k=3).tags


def test_tls_handshake_with_the_test_ca_and_tokens_on_reads(edge: Edge, sample_photos: dict[str, bytes]) -> None:
    address = edge.tls_gateway.address
    with GatewayClient(address, timeout=120, token=TOKEN, ca_file=edge.pki.ca) as client:
        assert client.search_text("a rocket", k=3).hits
        assert client.add_tags(["launchpad"])[0].ok
    # Over TLS but without a token: this gateway wants one on reads too.
    with GatewayClient(address, timeout=30, ca_file=edge.pki.ca) as anonymous:
        code, _ = code_of(lambda: anonymous.search_text("a rocket", k=3))
        assert code == grpc.StatusCode.UNAUTHENTICATED
        code, _ = code_of(lambda: list(anonymous.list_tags()))
        assert code == grpc.StatusCode.UNAUTHENTICATED


def test_tls_gateway_refuses_plaintext_and_untrusted_clients(edge: Edge, tmp_path: Path) -> None:
    address = edge.tls_gateway.address
    with GatewayClient(address, timeout=10, token=TOKEN) as plaintext:
        code, _ = code_of(lambda: plaintext.search_text("a rocket", k=3))
        assert code == grpc.StatusCode.UNAVAILABLE
    stranger = make_pki(tmp_path / "stranger", "stranger")
    with GatewayClient(address, timeout=10, token=TOKEN, ca_file=stranger.ca) as untrusting:
        code, _ = code_of(lambda: untrusting.search_text("a rocket", k=3))
        assert code == grpc.StatusCode.UNAVAILABLE
