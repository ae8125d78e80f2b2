"""Kubernetes manifests: every kustomize target renders and validates, and each project rule catches its fault."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from tests.deploy.helpers import ROOT

Obj = dict[str, Any]


def test_make_k8s_validate_passes_on_every_target() -> None:
    proc = subprocess.run(
        [sys.executable, "scripts/k8s_validate.py"], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for target in ("base", "overlays/dev", "overlays/prod-gpu", "prometheus-adapter"):
        assert f"ok   {target}:" in proc.stdout


def test_missing_kubectl_fails_with_instructions(tmp_path: Path) -> None:
    # A PATH holding only the Python interpreter: neither kubectl nor kustomize can be found.
    (tmp_path / "python").symlink_to(sys.executable)
    env = {**os.environ, "PATH": str(tmp_path)}
    proc = subprocess.run(
        [str(tmp_path / "python"), "scripts/k8s_validate.py"], cwd=ROOT, capture_output=True, text=True, env=env
    )
    assert proc.returncode == 2
    assert "neither kubectl nor kustomize is on PATH" in proc.stderr


@pytest.fixture(scope="module")
def prod(k8s_validate: ModuleType) -> list[Obj]:
    objects: list[Obj] = k8s_validate.render(k8s_validate.K8S / "overlays" / "prod-gpu")
    return objects


@pytest.fixture(scope="module")
def dev(k8s_validate: ModuleType) -> list[Obj]:
    objects: list[Obj] = k8s_validate.render(k8s_validate.K8S / "overlays" / "dev")
    return objects


def find(objects: list[Obj], kind: str, name: str) -> Obj:
    return next(o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name)


def container(objects: list[Obj], kind: str, name: str) -> Obj:
    c: Obj = find(objects, kind, name)["spec"]["template"]["spec"]["containers"][0]
    return c


def _set(path: list[Any], value: Any) -> Callable[[Obj], None]:
    def apply(obj: Obj) -> None:
        for key in path[:-1]:
            obj = obj[key]
        obj[path[-1]] = value

    return apply


def _delete(path: list[Any]) -> Callable[[Obj], None]:
    def apply(obj: Obj) -> None:
        for key in path[:-1]:
            obj = obj[key]
        del obj[path[-1]]

    return apply


def _append(path: list[Any], value: Any) -> Callable[[Obj], None]:
    def apply(obj: Obj) -> None:
        target: Any = obj
        for key in path:
            target = target[key]
        target.append(value)

    return apply


def _all(*changes: Callable[[Obj], None]) -> Callable[[Obj], None]:
    def apply(obj: Obj) -> None:
        for change in changes:
            change(obj)

    return apply


def _env(name: str, value: str) -> Callable[[Obj], None]:
    """Set a container env entry (by name) of a workload's first container."""

    def apply(obj: Obj) -> None:
        env = obj["spec"]["template"]["spec"]["containers"][0]["env"]
        next(e for e in env if e["name"] == name)["value"] = value

    return apply


def _volume_secret(volume: str, secret: str) -> Callable[[Obj], None]:
    def apply(obj: Obj) -> None:
        volumes = obj["spec"]["template"]["spec"]["volumes"]
        next(v for v in volumes if v["name"] == volume)["secret"]["secretName"] = secret

    return apply


POD = ["spec", "template", "spec"]
C0 = [*POD, "containers", 0]
DATA = ["data"]
SHARDS = "IMGSEARCH_GATEWAY_INDEX_SHARDS"
WRONG_NAMES = "a=index-0.index:50061,b=index-1.index:50061,c=index-2.index:50061,d=index-3.index:50061"
HPA_METRIC = ["spec", "metrics", 0, "pods", "metric"]
ENDPOINT = ["spec", "endpoints", 0]
FIRST_RULE = ["spec", "groups", 0, "rules", 0]
ANNOTATIONS = ["spec", "template", "metadata", "annotations"]
INGRESS0 = ["spec", "ingress", 0]
TOKEN = "_INTERNAL_TOKEN_FILE"
WRITER_PVC = {"name": "data", "persistentVolumeClaim": {"claimName": "tagger-data"}}
# (overlay, kind, name, change, expected message fragment): each fault one rule exists to catch.
FAULTS = [
    ("prod", "Deployment", "encoder", _set([*C0, "imagePullPolicyy"], "Always"), "'imagePullPolicyy' was unexpected"),
    ("prod", "Deployment", "gateway", _set([*C0, "securityContext", "readOnlyRootFilesystem"], False), "readOnlyRoot"),
    ("prod", "Deployment", "gateway", _set([*C0, "securityContext", "capabilities", "drop"], ["NET_RAW"]), "drop ALL"),
    ("prod", "StatefulSet", "index", _set([*POD, "securityContext", "runAsNonRoot"], False), "as root"),
    ("prod", "Deployment", "encoder", _delete([*C0, "startupProbe"]), "has no startupProbe"),
    ("prod", "Deployment", "gateway", _set([*C0, "readinessProbe", "grpc", "port"], 50050), "health port is 50070"),
    ("dev", "Deployment", "tagger", _set([*C0, "livenessProbe", "grpc", "port"], 9102), "grpc port is 50052"),
    ("dev", "Deployment", "encoder", _set([*C0, "ports", 1, "name"], "prom"), "no port named metrics"),
    ("dev", "Deployment", "encoder", _delete([*C0, "resources", "limits", "memory"]), "no limits.memory"),
    ("dev", "Deployment", "gateway", _set([*C0, "image"], "imgsearch/gateway:latest"), "explicit tag"),
    ("dev", "ConfigMap", "gateway-config", _set([*DATA, "IMGSEARCH_GATEWAY_MAXK"], "5"), "not a field of Gateway"),
    ("dev", "ConfigMap", "index-config", _set([*DATA, "IMGSEARCH_INDEX_INDEX_TYPE"], "bogus"), "unknown index type"),
    ("dev", "ConfigMap", "encoder-config", _set([*DATA, "IMGSEARCH_ENCODER_MAX_BATCH"], "many"), "MAX_BATCH='many'"),
    ("dev", "ConfigMap", "tagger-config", _set([*DATA, "IMGSEARCH_TAGGER_HOST"], "127.0.0.1"), "must be 0.0.0.0"),
    ("dev", "ConfigMap", "index-config", _set([*DATA, "IMGSEARCH_INDEX_METRICS_PORT"], "9200"), "metrics is 9111"),
    ("dev", "ConfigMap", "gateway-config", _delete([*DATA, "IMGSEARCH_GATEWAY_TAGGER_ADDRESS"]), "TAGGER_ADDRESS"),
    ("dev", "ConfigMap", "gateway-config", _set([*DATA, SHARDS], "index-0=index-0.index:50061"), "has 2 shards"),
    ("prod", "ConfigMap", "gateway-config", _set([*DATA, SHARDS], WRONG_NAMES), "expected index-0=index-0.index"),
    ("dev", "ConfigMap", "gateway-config", _set([*DATA, "IMGSEARCH_GATEWAY_GRACE_SECONDS"], "60"), "terminationGrace"),
    # The tagger writer: one replica, Recreate, never autoscaled; readers follow it and hold no volume.
    ("dev", "Deployment", "tagger-writer", _set(["spec", "strategy"], {"type": "RollingUpdate"}), "strategy Recreate"),
    ("dev", "Deployment", "tagger-writer", _set(["spec", "replicas"], 2), "replicas must be 1"),
    (
        "prod",
        "HorizontalPodAutoscaler",
        "tagger",
        _set(["spec", "scaleTargetRef", "name"], "tagger-writer"),
        "never autoscale",
    ),
    ("dev", "Deployment", "tagger", _env("IMGSEARCH_TAGGER_ROLE", "writer"), "a second tagger writer"),
    ("dev", "Deployment", "tagger", _append([*POD, "volumes"], WRITER_PVC), "must not mount a PersistentVolumeClaim"),
    (
        "dev",
        "Deployment",
        "tagger",
        _env("IMGSEARCH_TAGGER_WRITER_ADDRESS", "tagger:50052"),
        "name the writer's Service",
    ),
    (
        "dev",
        "ConfigMap",
        "gateway-config",
        _delete([*DATA, "IMGSEARCH_GATEWAY_TAGGER_WRITER_ADDRESS"]),
        "tag edits go to",
    ),
    (
        "dev",
        "ConfigMap",
        "gateway-config",
        _set([*DATA, "IMGSEARCH_GATEWAY_TAGGER_ADDRESS"], "tagger-writer:50052"),
        "read replicas' Service",
    ),
    # Addresses name a Service and its grpc port.
    (
        "dev",
        "ConfigMap",
        "gateway-config",
        _set([*DATA, "IMGSEARCH_GATEWAY_TAGGER_WRITER_ADDRESS"], "tagger-writer:50053"),
        "port 50053 is not a port",
    ),
    (
        "dev",
        "ConfigMap",
        "tagger-config",
        _set([*DATA, "IMGSEARCH_TAGGER_ENCODER_ADDRESS"], "encodr:50051"),
        "encodr is not a Service",
    ),
    (
        "dev",
        "ConfigMap",
        "tagger-config",
        _set([*DATA, "IMGSEARCH_TAGGER_ENCODER_ADDRESS"], "encoder:9101"),
        "not its grpc port",
    ),
    # NetworkPolicies: exactly the callers reach each internal gRPC port.
    ("dev", "NetworkPolicy", "tagger-writer-from-callers", _delete([*INGRESS0, "from"]), "which never call it"),
    (
        "dev",
        "NetworkPolicy",
        "tagger-writer-from-callers",
        _delete([*INGRESS0, "from", 1]),
        "tagger calls it, but no Network",
    ),
    (
        "prod",
        "NetworkPolicy",
        "index-from-gateway",
        _append([*INGRESS0, "from"], {"podSelector": {}}),
        "which never call it",
    ),
    # Internal token and TLS: consistent everywhere, on everywhere in prod, files on mounted Secrets.
    (
        "dev",
        "ConfigMap",
        "encoder-config",
        _set([*DATA, "IMGSEARCH_ENCODER" + TOKEN], "/etc/t/token"),
        "on no volume mounted",
    ),
    (
        "prod",
        "ConfigMap",
        "tagger-config",
        _delete([*DATA, "IMGSEARCH_TAGGER" + TOKEN]),
        "internal authentication is off",
    ),
    (
        "prod",
        "ConfigMap",
        "index-config",
        _delete([*DATA, "IMGSEARCH_INDEX" + TOKEN]),
        "while other services use the internal token",
    ),
    ("prod", "StatefulSet", "index", _volume_secret("internal-token", "index-token"), "comes from different Secrets"),
    (
        "prod",
        "ConfigMap",
        "index-config",
        _all(*(_delete([*DATA, f"IMGSEARCH_INDEX_TLS_{f}_FILE"]) for f in ("CERT", "KEY"))),
        "serves plaintext in production",
    ),
    (
        "prod",
        "ConfigMap",
        "encoder-config",
        _delete([*DATA, "IMGSEARCH_ENCODER_TLS_CLIENT_CA_FILE"]),
        "require client certificates",
    ),
    (
        "prod",
        "ConfigMap",
        "tagger-config",
        _all(*(_delete([*DATA, f"IMGSEARCH_TAGGER_PEER_TLS_{f}_FILE"]) for f in ("CERT", "KEY"))),
        "requires a client certificate (mTLS)",
    ),
    (
        "prod",
        "ConfigMap",
        "gateway-config",
        _delete([*DATA, "IMGSEARCH_GATEWAY_PEER_TLS_CA_FILE"]),
        "serves TLS but IMGSEARCH_GATEWAY_PEER_TLS_CA_FILE",
    ),
    ("prod", "ConfigMap", "encoder-config", _delete([*DATA, "IMGSEARCH_ENCODER_HEALTH_PORT"]), "probes cannot do TLS"),
    (
        "prod",
        "Deployment",
        "tagger-writer",
        _set([*C0, "livenessProbe", "grpc", "port"], 50052),
        "health port is 50070",
    ),
    (
        "prod",
        "ConfigMap",
        "gateway-config",
        _set([*DATA, "IMGSEARCH_GATEWAY_AUTH_TOKENS_FILE"], "/tmp/t"),
        "not a Secret or ConfigMap",
    ),
    (
        "dev",
        "Deployment",
        "gateway",
        _set([*C0, "startupProbe", "failureThreshold"], 10),
        "startupProbe gives up after 50s",
    ),
    # The query path in prod: >= 2 replicas, a budget that keeps one, anti-affinity.
    ("prod", "HorizontalPodAutoscaler", "tagger", _set(["spec", "minReplicas"], 1), "minReplicas 1 < 2"),
    ("prod", "PodDisruptionBudget", "tagger", _set(["spec", "maxUnavailable"], 2), "keep at least one pod available"),
    ("prod", "Deployment", "tagger", _delete([*POD, "affinity"]), "needs pod anti-affinity"),
    ("dev", "PodDisruptionBudget", "gateway", _set(["spec", "maxUnavailable"], 0), "blocks every drain"),
    ("prod", "HorizontalPodAutoscaler", "gateway", _set([*HPA_METRIC, "name"], "qps"), "not served"),
    ("prod", "Deployment", "encoder", _set(["spec", "replicas"], 2), "drop spec.replicas"),
    ("prod", "Deployment", "encoder", _delete([*C0, "resources", "limits", "nvidia.com/gpu"]), "nvidia.com/gpu limit"),
    ("prod", "ServiceMonitor", "imgsearch", _set([*ENDPOINT, "port"], "http-metrics"), "not a port of Service"),
    ("prod", "ServiceMonitor", "imgsearch", _set([*ENDPOINT, "intervall"], "5s"), "'intervall' was unexpected"),
    ("prod", "PrometheusRule", "imgsearch", _set([*FIRST_RULE, "for"], "30m"), "differs from deploy/monitoring/rules"),
    ("dev", "Service", "index", _set(["spec", "clusterIP"], "10.0.0.10"), "must be a headless Service"),
    ("dev", "Service", "encoder", _set(["spec", "ports", 1, "targetPort"], "prometheus"), "names no container port"),
    ("dev", "StatefulSet", "index", _set([*ANNOTATIONS, "prometheus.io/port"], "9100"), "prometheus.io/port"),
]


@pytest.mark.parametrize(("overlay", "kind", "name", "change", "message"), FAULTS, ids=[f[4] for f in FAULTS])
def test_each_rule_catches_its_fault(
    k8s_validate: ModuleType,
    prod: list[Obj],
    dev: list[Obj],
    overlay: str,
    kind: str,
    name: str,
    change: Callable[[Obj], None],
    message: str,
) -> None:
    objects = copy.deepcopy(prod if overlay == "prod" else dev)
    target = "overlays/prod-gpu" if overlay == "prod" else "overlays/dev"
    assert k8s_validate.check_target(target, copy.deepcopy(objects)).errors == []
    change(find(objects, kind, name))
    errors = k8s_validate.check_target(target, objects).errors
    assert any(message in e for e in errors), errors


def test_prod_overlay_shape(prod: list[Obj]) -> None:
    """What the production overlay promises: GPU encoder, four shards, HPAs, hardened edge."""
    encoder = find(prod, "Deployment", "encoder")["spec"]["template"]["spec"]
    assert encoder["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert encoder["containers"][0]["image"].endswith(":0.1.0-gpu")
    assert find(prod, "StatefulSet", "index")["spec"]["replicas"] == 4
    hpas = {h["spec"]["scaleTargetRef"]["name"]: h for h in prod if h["kind"] == "HorizontalPodAutoscaler"}
    assert set(hpas) == {"encoder", "gateway", "tagger"}
    assert all(h["spec"]["minReplicas"] >= 2 for h in hpas.values())
    gateway_env = find(prod, "ConfigMap", "gateway-config")["data"]
    assert gateway_env["IMGSEARCH_GATEWAY_AUTH_TOKENS_FILE"] == "/etc/imgsearch/auth/tokens"
    assert gateway_env["IMGSEARCH_GATEWAY_TLS_CERT_FILE"] == "/etc/imgsearch/tls/tls.crt"
    assert {o["kind"] for o in prod} >= {"ServiceMonitor", "PrometheusRule", "NetworkPolicy", "Namespace"}
    writer = find(prod, "Deployment", "tagger-writer")["spec"]
    assert writer["replicas"] == 1 and writer["strategy"]["type"] == "Recreate"
    assert find(prod, "PersistentVolumeClaim", "tagger-data")["spec"]["accessModes"] == ["ReadWriteOncePod"]
    reader = container(prod, "Deployment", "tagger")
    assert {e["name"]: e.get("value") for e in reader["env"]}["IMGSEARCH_TAGGER_ROLE"] == "reader"
    # Internal token and mTLS on every service, from the two shared Secrets.
    for service in ("encoder", "tagger", "index", "gateway"):
        data = find(prod, "ConfigMap", f"{service}-config")["data"]
        prefix = f"IMGSEARCH_{service.upper()}_"
        assert data[prefix + "INTERNAL_TOKEN_FILE"] == "/etc/imgsearch/internal-token/token"
        assert data[prefix + "TLS_CERT_FILE"] and data[prefix + "HEALTH_PORT"] == "50070"
    for kind, name in (("Deployment", n) for n in ("encoder", "tagger", "tagger-writer", "gateway")):
        secrets = {
            v["secret"]["secretName"]
            for v in find(prod, kind, name)["spec"]["template"]["spec"]["volumes"]
            if "secret" in v
        }
        assert {"imgsearch-internal-token", "imgsearch-internal-tls"} <= secrets, name


def test_dev_overlay_needs_no_operator_crds(dev: list[Obj]) -> None:
    assert not {o["apiVersion"].split("/")[0] for o in dev} & {"monitoring.coreos.com"}
    assert all(o["spec"].get("replicas") == 1 for o in dev if o["kind"] == "Deployment"), (
        "dev runs one replica of each Deployment"
    )
    assert find(dev, "StatefulSet", "index")["spec"]["replicas"] == 2
    assert {o["metadata"]["name"] for o in dev if o["kind"] == "Deployment"} == {
        "encoder",
        "gateway",
        "tagger",
        "tagger-writer",
    }


def test_dev_overlay_is_plaintext_without_the_internal_token(dev: list[Obj]) -> None:
    for service in ("encoder", "tagger", "index", "gateway"):
        data = find(dev, "ConfigMap", f"{service}-config")["data"]
        assert not [k for k in data if k.endswith(("_TOKEN_FILE", "TLS_CERT_FILE", "PEER_TLS_CA_FILE"))], service


def test_gateway_and_readers_reach_the_writer_and_nothing_else_does(k8s_validate: ModuleType, prod: list[Obj]) -> None:
    rendered = k8s_validate.Rendered("overlays/prod-gpu", prod)
    writer = find(prod, "Deployment", "tagger-writer")
    assert k8s_validate.ingress_sources(rendered, writer) == {"gateway", "tagger"}
