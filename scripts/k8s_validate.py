"""Render every kustomize target under deploy/k8s and validate it: Kubernetes schemas plus imgsearch's own rules.

    python scripts/k8s_validate.py              # validate (make k8s-validate)
    python scripts/k8s_validate.py --sync-rules # regenerate the PrometheusRule from deploy/monitoring/rules

Schemas: built-in kinds against the Kubernetes 1.32 OpenAPI schemas shipped by `kubernetes-validate`
(strict: unknown fields are errors); ServiceMonitor and PrometheusRule against deploy/k8s/schemas/.
Project rules: hardened pods, probes on the right ports, named ports, settings that exist in the services'
settings classes and parse, INDEX_SHARDS matching the StatefulSet, budgets that do not block drains,
autoscalers whose metrics the adapter serves, and the PrometheusRule equal to the promtool-tested rules.
Request path: every *_ADDRESS names a Service port in the render, the NetworkPolicies let exactly the
services that dial a port reach it, one single-replica Recreate tagger writer that no autoscaler targets,
read replicas that follow it, the gateway's reads on the replicas and its edits on the writer.
Internal security: token and TLS settings consistent between callers and callees, files on mounted volumes,
TLS servers probed on their plaintext health port; in prod the token and mTLS on every service, and the
query path (gateway, encoder, tagger read replicas) on >= 2 spread replicas with budgets that keep one.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib
import json
import re
import shutil
import subprocess
import sys
import typing
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "k8s"
RULES_FILE = ROOT / "deploy" / "monitoring" / "rules" / "imgsearch.rules.yml"
PROMETHEUS_RULE = K8S / "components" / "prometheus-operator" / "prometheusrule.yaml"
ADAPTER_CONFIG = K8S / "prometheus-adapter" / "config.yaml"
SCHEMAS = K8S / "schemas"
KUBERNETES_VERSION = "1.32.0"
# Every kustomization that renders on its own (components only render inside an overlay).
TARGETS = ("base", "overlays/dev", "overlays/prod-gpu", "prometheus-adapter")
# Secrets the operator creates before applying (docs/deploy.md); never committed.
EXTERNAL_SECRETS = {"gateway-auth-tokens", "gateway-tls", "imgsearch-internal-token", "imgsearch-internal-tls"}
SETTINGS_CLASSES = {
    "encoder": "imgsearch.encoder.settings:EncoderSettings",
    "tagger": "imgsearch.tagger.settings:TaggerSettings",
    "index": "imgsearch.index.settings:IndexSettings",
    "gateway": "imgsearch.gateway.settings:GatewaySettings",
}
PORT_NAMES = {"grpc", "metrics", "health"}
WORKLOAD_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "Job", "CronJob"}
# Workloads whose gRPC port is open to anyone (the public API); every other one only to its callers.
PUBLIC_WORKLOADS = {"gateway"}
# On the query path (searches, tagging): in production each needs >= 2 replicas, spread, and a budget.
QUERY_PATH = ("gateway", "encoder", "tagger")
# The Deployment that owns the tag vocabulary (IMGSEARCH_TAGGER_ROLE=writer, the default role).
TAGGER_WRITER = "tagger-writer"
OUTSIDE = "<outside the namespace>"

Obj = dict[str, Any]


class ToolMissing(Exception):
    """A required external tool is not installed."""


def kustomize_command() -> list[str]:
    """`kubectl kustomize` (kustomize is built into kubectl), else a standalone `kustomize build`."""
    kubectl = shutil.which("kubectl")
    if kubectl:
        return [kubectl, "kustomize"]
    standalone = shutil.which("kustomize")
    if standalone:
        return [standalone, "build"]
    raise ToolMissing(
        "neither kubectl nor kustomize is on PATH: install kubectl >= 1.27 (it includes kustomize), "
        "e.g. from your distribution or the Kubernetes release packages, then re-run"
    )


def render(target: Path) -> list[Obj]:
    """The objects `kustomize build` renders for a directory."""
    cmd = [*kustomize_command(), str(target)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr.strip()}")
    return [doc for doc in yaml.safe_load_all(proc.stdout) if doc]


def name_of(obj: Obj) -> str:
    return f"{obj.get('kind')}/{obj.get('metadata', {}).get('name')}"


# ---------------------------------------------------------------------------------------------------
# Schemas


def _crd_schema(kind: str, api_version: str) -> dict[str, Any] | None:
    group_version = api_version.replace("/", "-")
    path = SCHEMAS / f"{kind.lower()}.{group_version}.json"
    if not path.exists():
        return None
    schema: dict[str, Any] = json.loads(path.read_text())
    return schema


@functools.cache
def _builtin_validator(kind: str, api_version: str) -> Any:
    """A strict validator for a built-in kind from kubernetes-validate's schemas, loaded once per kind."""
    import jsonschema
    import referencing
    from kubernetes_validate import utils  # type: ignore[import-untyped]  # ships no type information

    wanted = utils.major_minor(KUBERNETES_VERSION)
    version = max(v for v in utils.all_versions() if utils.major_minor(v) == wanted)
    schema_dir = f"kubernetes-json-schema/v{version}-local-strict"
    # File naming as in kubernetes_validate.validate: "apps/v1" -> "apps-v1", "networking.k8s.io/v1" -> "networking-v1".
    group_version = re.sub(r"^([^./]*)(?:\.[^/]*)?/", r"\1-", api_version)
    try:
        schema = utils.schema_contents(f"{schema_dir}/{kind.lower()}-{group_version}.json", version)
    except FileNotFoundError:
        return None
    definitions = utils.schema_contents(f"{schema_dir}/_definitions.json", version)
    # Registered exactly as kubernetes_validate.validate does, so $refs resolve the same way.
    registry: referencing.Registry[Any] = referencing.Resource.from_contents(schema) @ referencing.Registry()
    registry = referencing.Resource.from_contents(definitions) @ registry
    return jsonschema.Draft202012Validator(schema, registry=registry)


@functools.cache
def _crd_validator(kind: str, api_version: str) -> Any:
    import jsonschema

    schema = _crd_schema(kind, api_version)
    return None if schema is None else jsonschema.Draft202012Validator(schema)


def schema_errors(obj: Obj) -> list[str]:
    """Validation errors of one object against its schema (built-in, or vendored for CRDs)."""
    kind, api_version = str(obj.get("kind", "")), str(obj.get("apiVersion", ""))
    validator = _crd_validator(kind, api_version) or _builtin_validator(kind, api_version)
    if validator is None:
        where = f"Kubernetes {KUBERNETES_VERSION} or deploy/k8s/schemas"
        return [f"{name_of(obj)}: no schema for {api_version} {kind} ({where})"]
    return [
        f"{name_of(obj)}: {'.'.join(str(p) for p in err.absolute_path) or '<root>'}: {err.message}"
        for err in sorted(validator.iter_errors(obj), key=lambda e: [str(p) for p in e.absolute_path])
    ]


# ---------------------------------------------------------------------------------------------------
# Project rules


@dataclass
class Rendered:
    """One rendered target, indexed for the checks."""

    target: str
    objects: list[Obj]
    errors: list[str] = field(default_factory=list)
    _env: dict[int, dict[str, str | None]] = field(default_factory=dict)

    def env(self, container: Obj) -> dict[str, str | None]:
        """container_env, computed (and its problems reported) once per container."""
        key = id(container)
        if key not in self._env:
            self._env[key] = container_env(self, container)
        return self._env[key]

    def workloads(self) -> list[Obj]:
        return [o for o in self.objects if o.get("kind") in WORKLOAD_KINDS]

    def services(self) -> list[tuple[Obj, Obj, str, dict[str, str | None]]]:
        """(workload, container, service, env) of every imgsearch container, the service named by its image."""
        out = []
        for w in self.workloads():
            for c in pod_spec(w).get("containers", []):
                service = service_of(c)
                if service is not None:
                    out.append((w, c, service, self.env(c)))
        return out

    def of_kind(self, kind: str) -> list[Obj]:
        return [o for o in self.objects if o.get("kind") == kind]

    def get(self, kind: str, name: str) -> Obj | None:
        return next((o for o in self.of_kind(kind) if o["metadata"]["name"] == name), None)

    def fail(self, obj: Obj | str, message: str) -> None:
        where = obj if isinstance(obj, str) else name_of(obj)
        self.errors.append(f"{where}: {message}")


def pod_spec(workload: Obj) -> Obj:
    spec: Obj = workload["spec"]
    if workload["kind"] == "CronJob":
        spec = spec["jobTemplate"]["spec"]
    template: Obj = spec["template"]
    return typing.cast(Obj, template["spec"])


def pod_labels(workload: Obj) -> dict[str, str]:
    spec = workload["spec"]
    if workload["kind"] == "CronJob":
        spec = spec["jobTemplate"]["spec"]
    return dict(spec["template"].get("metadata", {}).get("labels", {}))


def selects(selector: Obj | None, labels: dict[str, str]) -> bool:
    """Whether a LabelSelector (or a Service's plain map) selects these labels."""
    if not selector:
        return False
    if "matchLabels" in selector or "matchExpressions" in selector:
        match, exprs = selector.get("matchLabels", {}), selector.get("matchExpressions", [])
    else:
        match, exprs = selector, []
    if any(labels.get(k) != v for k, v in match.items()):
        return False
    for expr in exprs:
        key, op, values = expr["key"], expr["operator"], expr.get("values", [])
        if (
            (op == "In" and labels.get(key) not in values)
            or (op == "NotIn" and labels.get(key) in values)
            or (op == "Exists" and key not in labels)
            or (op == "DoesNotExist" and key in labels)
        ):
            return False
    return True


def service_of(container: Obj) -> str | None:
    """Which imgsearch service a container runs, from its image name (…/imgsearch/<service>:tag)."""
    image = str(container.get("image", ""))
    m = re.search(r"(?:^|/)imgsearch/([a-z]+)(?::|@|$)", image)
    return m.group(1) if m and m.group(1) in SETTINGS_CLASSES else None


def container_env(rendered: Rendered, container: Obj) -> dict[str, str | None]:
    """The container's environment: ConfigMap envFrom first, then env (value or None for valueFrom)."""
    env: dict[str, str | None] = {}
    for source in container.get("envFrom", []):
        ref = source.get("configMapRef")
        if ref:
            cm = rendered.get("ConfigMap", ref["name"])
            if cm is None:
                if not ref.get("optional"):
                    rendered.fail(f"container {container['name']}", f"envFrom ConfigMap {ref['name']} does not exist")
                continue
            env.update({k: str(v) for k, v in cm.get("data", {}).items()})
        elif source.get("secretRef") and source["secretRef"]["name"] not in EXTERNAL_SECRETS:
            rendered.fail(f"container {container['name']}", f"envFrom Secret {source['secretRef']['name']} is unknown")
    for var in container.get("env", []):
        env[var["name"]] = var.get("value") if "valueFrom" not in var else None
    return env


def settings_class(service: str) -> Any:
    """The pydantic settings class of a service (imported, so the check follows the code)."""
    module_name, class_name = SETTINGS_CLASSES[service].split(":")
    return getattr(importlib.import_module(module_name), class_name)


def check_mounted_files(
    rendered: Rendered, workload: Obj, container: Obj, prefix: str, env: dict[str, str | None]
) -> None:
    """Every *_FILE setting (tokens, certificates, keys, CAs) names a file on a mounted Secret or ConfigMap."""
    volumes = {v["name"]: v for v in pod_spec(workload).get("volumes", [])}
    mounts = [(m["mountPath"].rstrip("/"), volumes.get(m["name"], {})) for m in container.get("volumeMounts", [])]
    for var, value in env.items():
        if not (var.startswith(prefix) and var.endswith("_FILE") and value):
            continue
        source = next(
            (vol for path, vol in mounts if value.startswith(path + "/")),
            None,
        )
        if source is None:
            rendered.fail(workload, f"{var}={value} is on no volume mounted into container {container['name']}")
        elif not {"secret", "configMap", "projected", "csi"} & set(source):
            rendered.fail(workload, f"{var}={value} is on volume {source.get('name')}, not a Secret or ConfigMap")


def mounted_secret(workload: Obj, container: Obj, path: str) -> str | None:
    """Name of the Secret whose mount holds `path` in this container, if any."""
    volumes = {v["name"]: v for v in pod_spec(workload).get("volumes", [])}
    for m in container.get("volumeMounts", []):
        if path.startswith(m["mountPath"].rstrip("/") + "/"):
            secret = volumes.get(m["name"], {}).get("secret", {}).get("secretName")
            return str(secret) if secret else None
    return None


def _is_path_field(annotation: Any) -> bool:
    """Settings naming files or directories: their existence is a property of the image, not of YAML."""
    return "Path" in str(annotation)


def check_settings(rendered: Rendered, workload: Obj, container: Obj, service: str, env: dict[str, str | None]) -> None:
    """Every IMGSEARCH_ variable is a field of the service's settings class, and the values parse."""
    from pydantic import ValidationError

    cls = settings_class(service)
    class_name = cls.__name__
    prefix = f"IMGSEARCH_{service.upper()}_"
    fields: dict[str, Any] = cls.model_fields
    values: dict[str, Any] = {}
    for var, value in env.items():
        if not var.startswith("IMGSEARCH_"):
            continue
        if not var.startswith(prefix):
            # IMGSEARCH_MODEL_DIR is read by the shared model-dir default; anything else is a typo.
            if var != "IMGSEARCH_MODEL_DIR":
                rendered.fail(workload, f"{var} is not an {prefix}* setting")
            continue
        key = var[len(prefix) :].lower()
        if key not in fields:
            rendered.fail(workload, f"{var} is not a field of {class_name} (known: {', '.join(sorted(fields))})")
            continue
        # valueFrom (e.g. the pod name as SHARD) is resolved by the kubelet: use a representative value.
        values[key] = value if value is not None else f"{workload['metadata']['name']}-0"
    try:
        cls.model_validate(values)
    except ValidationError as exc:
        for err in exc.errors():
            key = str(err["loc"][0]) if err["loc"] else ""
            if key in fields and _is_path_field(fields[key].annotation):
                continue
            var = f"{prefix}{key.upper()}"
            rendered.fail(workload, f"{var}={values.get(key, '<unset>')!r}: {err['msg']}")
    # The bind addresses and ports in the environment must be the ones the pod and probes use.
    ports = {p.get("name"): p.get("containerPort") for p in container.get("ports", [])}
    for suffix, port_name in (("PORT", "grpc"), ("METRICS_PORT", "metrics"), ("HEALTH_PORT", "health")):
        value = env.get(prefix + suffix)
        if value is not None and port_name in ports and int(value) != ports[port_name]:
            rendered.fail(workload, f"{prefix}{suffix}={value} but container port {port_name} is {ports[port_name]}")
        if value is not None and port_name not in ports:
            rendered.fail(workload, f"{prefix}{suffix} is set but the container has no port named {port_name}")
    for suffix in ("HOST", "METRICS_HOST"):
        if env.get(prefix + suffix) not in ("0.0.0.0", "::"):
            rendered.fail(workload, f"{prefix}{suffix} must be 0.0.0.0 in a pod (the default 127.0.0.1 is unreachable)")


def _duration_budget(probe: Obj) -> float:
    return float(probe.get("periodSeconds", 10)) * float(probe.get("failureThreshold", 3))


def check_container(rendered: Rendered, workload: Obj, container: Obj) -> None:
    """Hardening, probes, ports and resources of one imgsearch container."""
    sc = container.get("securityContext", {})
    pod_sc = pod_spec(workload).get("securityContext", {})
    if not (sc.get("runAsNonRoot") or pod_sc.get("runAsNonRoot")):
        rendered.fail(workload, f"container {container['name']} may run as root (runAsNonRoot)")
    if (sc.get("runAsUser", pod_sc.get("runAsUser")) or 0) == 0:
        rendered.fail(workload, f"container {container['name']} has no non-zero runAsUser")
    if sc.get("readOnlyRootFilesystem") is not True:
        rendered.fail(workload, f"container {container['name']} lacks readOnlyRootFilesystem: true")
    if sc.get("allowPrivilegeEscalation") is not False:
        rendered.fail(workload, f"container {container['name']} lacks allowPrivilegeEscalation: false")
    if sc.get("privileged"):
        rendered.fail(workload, f"container {container['name']} is privileged")
    caps = sc.get("capabilities", {})
    if "ALL" not in caps.get("drop", []) or caps.get("add"):
        rendered.fail(workload, f"container {container['name']} must drop ALL capabilities and add none")
    seccomp = sc.get("seccompProfile", pod_sc.get("seccompProfile", {}))
    if seccomp.get("type") != "RuntimeDefault":
        rendered.fail(workload, f"container {container['name']} lacks seccompProfile RuntimeDefault")
    mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
    volumes = {v["name"]: v for v in pod_spec(workload).get("volumes", [])}
    if "emptyDir" not in volumes.get(mounts.get("/tmp", ""), {}):
        rendered.fail(workload, f"container {container['name']} has no writable emptyDir at /tmp")

    ports = {p.get("name"): p for p in container.get("ports", [])}
    for name in ("grpc", "metrics"):
        if name not in ports:
            rendered.fail(workload, f"container {container['name']} has no port named {name}")
    for name in ports:
        if name not in PORT_NAMES:
            rendered.fail(workload, f"container port {name!r} is not one of {sorted(PORT_NAMES)}")
    probe_port_name = "health" if "health" in ports else "grpc"
    probe_port = ports.get(probe_port_name, {}).get("containerPort")
    for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
        probe = container.get(kind)
        if not probe:
            rendered.fail(workload, f"container {container['name']} has no {kind}")
            continue
        if "grpc" not in probe:
            rendered.fail(workload, f"{kind} of {container['name']} is not a native gRPC health probe")
        elif probe["grpc"].get("port") != probe_port:
            rendered.fail(
                workload,
                f"{kind} of {container['name']} checks port {probe['grpc'].get('port')}, "
                f"but the {probe_port_name} port is {probe_port}",
            )

    resources = container.get("resources", {})
    for section in ("requests", "limits"):
        for res in ("cpu", "memory"):
            if res not in resources.get(section, {}):
                rendered.fail(workload, f"container {container['name']} has no {section}.{res}")

    image = str(container.get("image", ""))
    tag = image.rsplit(":", 1)[1] if ":" in image.rsplit("/", 1)[-1] else ""
    if (not tag or tag == "latest") and "@sha256:" not in image:
        rendered.fail(workload, f"image {image!r} needs an explicit tag (not latest)")

    service = service_of(container)
    if service is None:
        rendered.fail(workload, f"container {container['name']} runs {image!r}, not an imgsearch service image")
        return
    env = rendered.env(container)
    check_settings(rendered, workload, container, service, env)
    prefix = f"IMGSEARCH_{service.upper()}_"

    # Kubelet's gRPC probes cannot speak TLS: a TLS server needs its plaintext health port (probed above).
    if env.get(prefix + "TLS_CERT_FILE") and not env.get(prefix + "HEALTH_PORT"):
        rendered.fail(
            workload,
            f"{prefix}TLS_CERT_FILE turns TLS on, but {prefix}HEALTH_PORT is unset: kubelet's gRPC probes "
            "cannot do TLS, so they need the plaintext health port",
        )
    check_mounted_files(rendered, workload, container, prefix, env)

    # Start-up waits for peers up to STARTUP_TIMEOUT_SECONDS: the startup probe must not give up first.
    startup = container.get("startupProbe")
    fields = settings_class(service).model_fields
    if startup and "startup_timeout_seconds" in fields:
        raw = env.get(prefix + "STARTUP_TIMEOUT_SECONDS")
        timeout = float(raw) if raw else float(fields["startup_timeout_seconds"].default)
        if _duration_budget(startup) < timeout:
            rendered.fail(
                workload,
                f"startupProbe gives up after {_duration_budget(startup):g}s, before {prefix}STARTUP_TIMEOUT_SECONDS "
                f"{timeout:g}: the pod is restarted while it still waits for its peers",
            )

    # Graceful termination: the drain fits in the grace period, and liveness never kills a draining pod.
    grace = float(env.get(f"IMGSEARCH_{service.upper()}_GRACE_SECONDS") or 10.0)
    pre_stop = container.get("lifecycle", {}).get("preStop", {})
    sleep = float(pre_stop.get("sleep", {}).get("seconds", 0))
    termination = float(pod_spec(workload).get("terminationGracePeriodSeconds", 30))
    if termination <= grace + sleep:
        rendered.fail(
            workload,
            f"terminationGracePeriodSeconds {termination:g} must exceed GRACE_SECONDS {grace:g} + preStop {sleep:g}",
        )
    liveness = container.get("livenessProbe")
    if liveness and _duration_budget(liveness) <= grace:
        rendered.fail(workload, f"liveness fails after {_duration_budget(liveness):g}s, within GRACE_SECONDS {grace:g}")


def check_workloads(rendered: Rendered) -> None:
    for workload in (o for o in rendered.objects if o["kind"] in WORKLOAD_KINDS):
        spec = pod_spec(workload)
        if spec.get("automountServiceAccountToken") is not False:
            rendered.fail(workload, "automountServiceAccountToken must be false (no service needs the API)")
        for container in [*spec.get("initContainers", []), *spec.get("containers", [])]:
            check_container(rendered, workload, container)
        for vol in spec.get("volumes", []):
            if "configMap" in vol and rendered.get("ConfigMap", vol["configMap"]["name"]) is None:
                rendered.fail(workload, f"volume {vol['name']}: ConfigMap {vol['configMap']['name']} does not exist")
            if "persistentVolumeClaim" in vol:
                claim = vol["persistentVolumeClaim"]["claimName"]
                if rendered.get("PersistentVolumeClaim", claim) is None:
                    rendered.fail(workload, f"volume {vol['name']}: PersistentVolumeClaim {claim} does not exist")
            secret = vol.get("secret", {}).get("secretName")
            if secret and secret not in EXTERNAL_SECRETS and rendered.get("Secret", secret) is None:
                rendered.fail(workload, f"volume {vol['name']}: Secret {secret} is unknown")
        if not any(
            selects(pdb["spec"].get("selector"), pod_labels(workload))
            for pdb in rendered.of_kind("PodDisruptionBudget")
        ):
            rendered.fail(workload, "no PodDisruptionBudget selects its pods")


def hpa_for(rendered: Rendered, workload: Obj) -> Obj | None:
    for hpa in rendered.of_kind("HorizontalPodAutoscaler"):
        ref = hpa["spec"]["scaleTargetRef"]
        if ref["kind"] == workload["kind"] and ref["name"] == workload["metadata"]["name"]:
            return hpa
    return None


# ---------------------------------------------------------------------------------------------------
# The request path: who dials whom, derived from the settings


def peer_addresses(service: str, env: dict[str, str | None]) -> list[tuple[str, str]]:
    """(variable, host:port) of every peer a service dials: its *_ADDRESS settings and the gateway's shards."""
    prefix = f"IMGSEARCH_{service.upper()}_"
    out = [(var, str(v)) for var, v in env.items() if var.startswith(prefix) and var.endswith("_ADDRESS") and v]
    shards = env.get(prefix + "INDEX_SHARDS")
    if service == "gateway" and shards:
        from imgsearch.gateway.settings import parse_shards

        with contextlib.suppress(ValueError):  # check_settings reports a malformed list
            out += [(prefix + "INDEX_SHARDS", address) for _, address in parse_shards(shards)]
    return out


def resolve(rendered: Rendered, address: str) -> tuple[Obj | None, list[Obj], str]:
    """The Service an in-cluster address names (`svc:port`, `pod.svc:port`, `svc.ns.svc...`), the workloads
    behind it, and a problem ("" when none)."""
    address = re.sub(r"^dns:(///)?", "", address)
    host, _, port = address.rpartition(":")
    labels = host.split(".")
    svc = rendered.get("Service", labels[0])
    if svc is None and len(labels) > 1:
        # A pod of a headless Service: <pod>.<service>.
        svc = rendered.get("Service", labels[1])
        if svc is not None and svc["spec"].get("clusterIP") != "None":
            return svc, [], f"{host} names a pod of Service {labels[1]}, which is not headless"
    if svc is None:
        return None, [], f"{host} is not a Service in this deployment"
    ports = {str(p["port"]) for p in svc["spec"]["ports"]}
    grpc_ports = {str(p["port"]) for p in svc["spec"]["ports"] if p.get("name") == "grpc"}
    if port not in ports:
        return svc, [], f"port {port} is not a port of Service {svc['metadata']['name']} ({', '.join(sorted(ports))})"
    if port not in grpc_ports:
        return svc, [], f"port {port} of Service {svc['metadata']['name']} is not its grpc port"
    targets = [w for w in rendered.workloads() if selects(svc["spec"].get("selector"), pod_labels(w))]
    if not targets:
        return svc, [], f"Service {svc['metadata']['name']} selects no workload"
    return svc, targets, ""


@dataclass(frozen=True)
class Call:
    """One caller workload dialing one callee workload through the setting `var`."""

    caller: Obj
    callee: Obj
    var: str


def calls(rendered: Rendered) -> list[Call]:
    """Every call edge the services' settings create; unresolvable addresses are reported."""
    edges: list[Call] = []
    seen: set[tuple[str, str, str]] = set()
    for w, _, service, env in rendered.services():
        for var, address in peer_addresses(service, env):
            _, targets, problem = resolve(rendered, address)
            if problem:
                key = (name_of(w), var, address)
                if key not in seen:
                    seen.add(key)
                    rendered.fail(w, f"{var}={address}: {problem}")
                continue
            edges.extend(Call(w, t, var) for t in targets)
    return edges


def grpc_port(workload: Obj) -> tuple[str, int | None]:
    for c in pod_spec(workload)["containers"]:
        for p in c.get("ports", []):
            if p.get("name") == "grpc":
                return "grpc", p.get("containerPort")
    return "grpc", None


def ingress_sources(rendered: Rendered, workload: Obj) -> set[str]:
    """Which workloads (by name, or OUTSIDE) the NetworkPolicies let reach this workload's gRPC port."""
    labels = pod_labels(workload)
    port_name, port_number = grpc_port(workload)
    everyone = {OUTSIDE, *(w["metadata"]["name"] for w in rendered.workloads())}
    policies = [
        p
        for p in rendered.of_kind("NetworkPolicy")
        if selects(p["spec"].get("podSelector") or {"matchLabels": {}}, labels) or p["spec"].get("podSelector") == {}
    ]
    policies = [p for p in policies if "Ingress" in p["spec"].get("policyTypes", ["Ingress"])]
    if not policies:
        return everyone  # no policy isolates the pods: anything may connect
    allowed: set[str] = set()
    for policy in policies:
        for rule in policy["spec"].get("ingress", []):
            ports = rule.get("ports") or []
            if ports and not any(p.get("port") in (port_name, port_number) for p in ports):
                continue
            peers = rule.get("from") or []
            if not peers:
                return everyone
            for peer in peers:
                if "ipBlock" in peer or "namespaceSelector" in peer:
                    allowed.add(OUTSIDE)
                elif "podSelector" in peer:
                    allowed |= {
                        w["metadata"]["name"]
                        for w in rendered.workloads()
                        if selects(peer["podSelector"] or {"matchLabels": {}}, pod_labels(w))
                        or peer["podSelector"] == {}
                    }
    return allowed


def check_network(rendered: Rendered, edges: list[Call]) -> None:
    """Exactly the workloads that dial a gRPC port may reach it (the public gateway aside), no more, no fewer."""
    if not rendered.of_kind("NetworkPolicy"):
        return
    for w, _, _, _ in rendered.services():
        name = w["metadata"]["name"]
        callers = {e.caller["metadata"]["name"] for e in edges if e.callee is w}
        allowed = ingress_sources(rendered, w)
        for caller in sorted(callers - allowed):
            rendered.fail(w, f"{caller} calls it, but no NetworkPolicy lets {caller} reach its grpc port")
        if name in PUBLIC_WORKLOADS:
            continue
        extra = allowed - callers
        if extra:
            rendered.fail(
                w,
                f"NetworkPolicies let {', '.join(sorted(extra))} reach its grpc port, which never call it "
                f"(callers: {', '.join(sorted(callers)) or 'none'})",
            )


def tagger_role(env: dict[str, str | None]) -> str:
    return env.get("IMGSEARCH_TAGGER_ROLE") or "writer"  # the settings' default role


def check_tagger(rendered: Rendered) -> None:
    """One writer (1 replica, Recreate, a claim, no autoscaler); readers follow it; the gateway splits reads/edits."""
    taggers = [(w, c, env) for w, c, service, env in rendered.services() if service == "tagger"]
    writers = [(w, c, env) for w, c, env in taggers if tagger_role(env) == "writer"]
    readers = [(w, c, env) for w, c, env in taggers if tagger_role(env) == "reader"]
    if not writers:
        rendered.fail(f"Deployment/{TAGGER_WRITER}", "missing: no tagger runs IMGSEARCH_TAGGER_ROLE=writer")
        return
    for w, _, _ in writers[1:]:
        rendered.fail(w, f"a second tagger writer (IMGSEARCH_TAGGER_ROLE=writer; {name_of(writers[0][0])} is one)")
    writer = writers[0][0]
    if writer["metadata"]["name"] != TAGGER_WRITER:
        rendered.fail(writer, f"the tagger writer must be Deployment/{TAGGER_WRITER} (readers set ROLE=reader)")
    if writer["kind"] != "Deployment":
        rendered.fail(writer, "the tagger writer must be a Deployment")
    if writer["spec"].get("replicas", 1) != 1:
        rendered.fail(writer, "the tagger writer is a single SQLite writer: replicas must be 1")
    if writer["spec"].get("strategy", {}).get("type") != "Recreate":
        rendered.fail(writer, "the tagger writer must roll out with strategy Recreate (never two writers)")
    hpa = hpa_for(rendered, writer)
    if hpa is not None:
        rendered.fail(hpa, "targets the single tagger writer: it must never autoscale (scale the readers instead)")
    if not any("persistentVolumeClaim" in v for v in pod_spec(writer).get("volumes", [])):
        rendered.fail(writer, "the vocabulary needs a PersistentVolumeClaim")

    for w, _, env in readers:
        if any("persistentVolumeClaim" in v for v in pod_spec(w).get("volumes", [])):
            rendered.fail(w, "a tagger read replica is stateless: it must not mount a PersistentVolumeClaim")
        address = env.get("IMGSEARCH_TAGGER_WRITER_ADDRESS") or ""
        _, targets, _ = resolve(rendered, address) if address else (None, [], "")
        if [t["metadata"]["name"] for t in targets] != [writer["metadata"]["name"]]:
            rendered.fail(w, f"IMGSEARCH_TAGGER_WRITER_ADDRESS={address!r} must name the writer's Service")

    gateway = rendered.get("Deployment", "gateway")
    if gateway is None:
        return
    genv = rendered.env(pod_spec(gateway)["containers"][0])
    reads = genv.get("IMGSEARCH_GATEWAY_TAGGER_ADDRESS") or ""
    edits = genv.get("IMGSEARCH_GATEWAY_TAGGER_WRITER_ADDRESS") or reads  # the settings' fallback
    _, read_targets, _ = resolve(rendered, reads) if reads else (None, [], "")
    _, edit_targets, _ = resolve(rendered, edits) if edits else (None, [], "")
    reader_names = {w["metadata"]["name"] for w, _, _ in readers}
    if readers and not ({t["metadata"]["name"] for t in read_targets} <= reader_names and read_targets):
        rendered.fail(
            gateway, f"IMGSEARCH_GATEWAY_TAGGER_ADDRESS={reads!r} must name the tagger read replicas' Service"
        )
    if [t["metadata"]["name"] for t in edit_targets] != [writer["metadata"]["name"]]:
        rendered.fail(
            gateway,
            f"tag edits go to {edits!r}: IMGSEARCH_GATEWAY_TAGGER_WRITER_ADDRESS must name the writer's Service",
        )


# ---------------------------------------------------------------------------------------------------
# Internal authentication and TLS


def check_internal_security(rendered: Rendered, edges: list[Call]) -> None:
    """Token and TLS settings agree between every caller and callee (else calls fail, or a service is open)."""
    services = rendered.services()
    token_sources: dict[str, list[str]] = {}
    for w, c, service, env in services:
        prefix = f"IMGSEARCH_{service.upper()}_"
        path = env.get(prefix + "INTERNAL_TOKEN_FILE")
        if path:
            token_sources.setdefault(str(mounted_secret(w, c, path)), []).append(w["metadata"]["name"])
    if token_sources:
        with_token = {n for names in token_sources.values() for n in names}
        for w, _, service, _ in services:
            if w["metadata"]["name"] not in with_token:
                rendered.fail(
                    w,
                    f"IMGSEARCH_{service.upper()}_INTERNAL_TOKEN_FILE is unset while other services use the internal "
                    "token: it is open to any caller, or its calls are refused",
                )
        if len(token_sources) > 1:
            listed = "; ".join(f"Secret {s}: {', '.join(sorted(n))}" for s, n in sorted(token_sources.items()))
            rendered.fail("internal token", f"comes from different Secrets, so services reject each other ({listed})")

    def env_of(w: Obj) -> tuple[str, dict[str, str | None]]:
        c = pod_spec(w)["containers"][0]
        service = service_of(c) or ""
        return f"IMGSEARCH_{service.upper()}_", rendered.env(c)

    seen: set[tuple[str, str]] = set()
    for e in edges:
        key = (e.caller["metadata"]["name"], e.callee["metadata"]["name"])
        if key in seen:
            continue
        seen.add(key)
        callee = key[1]
        cp, cenv = env_of(e.caller)
        sp, senv = env_of(e.callee)
        serves_tls = bool(senv.get(sp + "TLS_CERT_FILE"))
        dials_tls = bool(cenv.get(cp + "PEER_TLS_CA_FILE"))
        if serves_tls and not dials_tls:
            rendered.fail(e.caller, f"{callee} serves TLS but {cp}PEER_TLS_CA_FILE is unset: its calls to it fail")
        if dials_tls and not serves_tls:
            rendered.fail(e.caller, f"{cp}PEER_TLS_CA_FILE makes it dial {callee} with TLS, but {callee} is plaintext")
        if senv.get(sp + "TLS_CLIENT_CA_FILE") and not cenv.get(cp + "PEER_TLS_CERT_FILE"):
            rendered.fail(
                e.caller, f"{callee} requires a client certificate (mTLS) but {cp}PEER_TLS_CERT_FILE is unset"
            )


def check_prod_security(rendered: Rendered, edges: list[Call]) -> None:
    """Production: the internal token on every service, TLS on every server port, mTLS between the services."""
    callers = {e.caller["metadata"]["name"] for e in edges}
    for w, _, service, env in rendered.services():
        prefix = f"IMGSEARCH_{service.upper()}_"
        if not env.get(prefix + "INTERNAL_TOKEN_FILE"):
            rendered.fail(w, f"{prefix}INTERNAL_TOKEN_FILE is unset: internal authentication is off in production")
        if not env.get(prefix + "TLS_CERT_FILE"):
            rendered.fail(w, f"{prefix}TLS_CERT_FILE is unset: its gRPC port serves plaintext in production")
        if w["metadata"]["name"] not in PUBLIC_WORKLOADS and not env.get(prefix + "TLS_CLIENT_CA_FILE"):
            rendered.fail(w, f"{prefix}TLS_CLIENT_CA_FILE is unset: internal servers require client certificates")
        if w["metadata"]["name"] in callers:
            for suffix in ("PEER_TLS_CA_FILE", "PEER_TLS_CERT_FILE", "PEER_TLS_KEY_FILE"):
                if not env.get(prefix + suffix):
                    rendered.fail(w, f"{prefix}{suffix} is unset: its calls to peers need mTLS in production")


def check_query_path(rendered: Rendered) -> None:
    """Production: every query-path workload has >= 2 replicas, a budget that keeps one, and anti-affinity."""
    for name in QUERY_PATH:
        w = rendered.get("Deployment", name)
        if w is None:
            rendered.fail(f"Deployment/{name}", "missing")
            continue
        hpa = hpa_for(rendered, w)
        if hpa is None:
            rendered.fail(w, "has no HorizontalPodAutoscaler in the production overlay")
        replicas = int(hpa["spec"].get("minReplicas", 1)) if hpa else int(w["spec"].get("replicas", 1))
        if replicas < 2:
            what = f"{name_of(hpa)} minReplicas" if hpa else "replicas"
            rendered.fail(w, f"is on the query path: {what} {replicas} < 2 (one pod's restart would stop queries)")
        budgets = [
            p for p in rendered.of_kind("PodDisruptionBudget") if selects(p["spec"].get("selector"), pod_labels(w))
        ]
        keeps = False
        for pdb in budgets:
            min_available, max_unavailable = pdb["spec"].get("minAvailable"), pdb["spec"].get("maxUnavailable")
            keeps |= isinstance(min_available, int) and min_available >= 1
            keeps |= isinstance(max_unavailable, int) and max_unavailable < replicas
        if not keeps:
            rendered.fail(w, "is on the query path: its PodDisruptionBudget must keep at least one pod available")
        anti = pod_spec(w).get("affinity", {}).get("podAntiAffinity", {})
        terms = [t.get("podAffinityTerm", t) for k in anti.values() for t in k]
        if not any(
            t.get("topologyKey") == "kubernetes.io/hostname" and selects(t.get("labelSelector"), pod_labels(w))
            for t in terms
        ):
            rendered.fail(w, "is on the query path: needs pod anti-affinity on kubernetes.io/hostname for its own pods")


def check_index(rendered: Rendered) -> None:
    """The StatefulSet, its headless Service and the gateway's INDEX_SHARDS agree on every shard."""
    sts = rendered.get("StatefulSet", "index")
    if sts is None:
        rendered.fail("StatefulSet/index", "missing")
        return
    if not sts["spec"].get("volumeClaimTemplates"):
        rendered.fail(sts, "each shard needs its own PersistentVolumeClaim (volumeClaimTemplates)")
    svc = rendered.get("Service", sts["spec"]["serviceName"])
    if svc is None or svc["spec"].get("clusterIP") != "None":
        rendered.fail(sts, f"serviceName {sts['spec']['serviceName']} must be a headless Service")
    container = pod_spec(sts)["containers"][0]
    grpc_port = next((p["containerPort"] for p in container.get("ports", []) if p.get("name") == "grpc"), None)
    env = rendered.env(container)
    shard_var = env.get("IMGSEARCH_INDEX_SHARD", "")
    shard_from_pod = any(
        v["name"] == "IMGSEARCH_INDEX_SHARD"
        and v.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") == "metadata.name"
        for v in container.get("env", [])
    )
    if not shard_from_pod:
        rendered.fail(sts, f"IMGSEARCH_INDEX_SHARD must come from the pod name (got {shard_var!r})")

    name, replicas = sts["metadata"]["name"], int(sts["spec"].get("replicas", 1))
    service_name = sts["spec"]["serviceName"]
    want = [(f"{name}-{i}", f"{name}-{i}.{service_name}:{grpc_port}") for i in range(replicas)]
    gateway = rendered.get("Deployment", "gateway")
    if gateway is None:
        rendered.fail("Deployment/gateway", "missing")
        return
    genv = rendered.env(pod_spec(gateway)["containers"][0])
    spec = genv.get("IMGSEARCH_GATEWAY_INDEX_SHARDS") or ""
    from imgsearch.gateway.settings import parse_shards

    try:
        got = parse_shards(spec)
    except ValueError as exc:
        rendered.fail(gateway, f"IMGSEARCH_GATEWAY_INDEX_SHARDS={spec!r}: {exc}")
        return
    if got != want:
        rendered.fail(
            gateway,
            f"IMGSEARCH_GATEWAY_INDEX_SHARDS names {[n for n, _ in got]} at {[a for _, a in got]}, but the "
            f"StatefulSet has {replicas} shards: expected {','.join(f'{n}={a}' for n, a in want)}",
        )


def check_services(rendered: Rendered) -> None:
    workloads = [o for o in rendered.objects if o["kind"] in WORKLOAD_KINDS]
    for svc in rendered.of_kind("Service"):
        targets = [w for w in workloads if selects(svc["spec"].get("selector"), pod_labels(w))]
        if not targets:
            rendered.fail(svc, "selects no workload's pods")
            continue
        container_ports = {
            p.get("name"): p.get("containerPort")
            for w in targets
            for c in pod_spec(w)["containers"]
            for p in c.get("ports", [])
        }
        names = {p.get("name") for p in svc["spec"]["ports"]}
        if not {"grpc", "metrics"} <= names:
            rendered.fail(svc, f"ports must include grpc and metrics (got {sorted(str(n) for n in names)})")
        for port in svc["spec"]["ports"]:
            if port.get("name") not in PORT_NAMES:
                rendered.fail(svc, f"port {port.get('name')!r} is not one of {sorted(PORT_NAMES)}")
            target = port.get("targetPort", port["port"])
            if isinstance(target, str) and target not in container_ports:
                rendered.fail(svc, f"targetPort {target!r} names no container port")


def check_budgets(rendered: Rendered) -> None:
    """A PodDisruptionBudget must leave room to evict at least one pod, or node drains hang forever."""
    workloads = [o for o in rendered.objects if o["kind"] in WORKLOAD_KINDS]
    for pdb in rendered.of_kind("PodDisruptionBudget"):
        matched = [w for w in workloads if selects(pdb["spec"].get("selector"), pod_labels(w))]
        if not matched:
            rendered.fail(pdb, "selects no workload's pods")
            continue
        for w in matched:
            hpa = hpa_for(rendered, w)
            replicas = int(hpa["spec"].get("minReplicas", 1)) if hpa else int(w["spec"].get("replicas", 1))
            min_available = pdb["spec"].get("minAvailable")
            if isinstance(min_available, int) and min_available >= replicas:
                rendered.fail(pdb, f"minAvailable {min_available} with {replicas} replica(s) blocks every drain")
            if pdb["spec"].get("maxUnavailable") == 0:
                rendered.fail(pdb, "maxUnavailable 0 blocks every drain")


def adapter_metric_names() -> set[str]:
    """Custom metric names prometheus-adapter serves, from its config's `name.as` entries."""
    config = yaml.safe_load(ADAPTER_CONFIG.read_text())
    return {rule["name"]["as"] for rule in config.get("rules", []) if rule.get("name", {}).get("as")}


def check_autoscalers(rendered: Rendered) -> None:
    served = adapter_metric_names()
    for hpa in rendered.of_kind("HorizontalPodAutoscaler"):
        ref = hpa["spec"]["scaleTargetRef"]
        target = rendered.get(ref["kind"], ref["name"])
        if target is None:
            rendered.fail(hpa, f"scales {ref['kind']}/{ref['name']}, which does not exist")
            continue
        if "replicas" in target["spec"]:
            rendered.fail(target, "is autoscaled: drop spec.replicas, or every apply resets the HPA's choice")
        kinds = {m["type"] for m in hpa["spec"].get("metrics", [])}
        if not {"Resource", "Pods"} <= kinds:
            rendered.fail(hpa, "should scale on CPU (Resource) and on a per-pod custom metric (Pods)")
        for metric in hpa["spec"].get("metrics", []):
            if metric["type"] == "Pods" and metric["pods"]["metric"]["name"] not in served:
                rendered.fail(
                    hpa, f"custom metric {metric['pods']['metric']['name']} is not served by {ADAPTER_CONFIG.name}"
                )
            if metric["type"] == "Resource":
                name = metric["resource"]["name"]
                for c in pod_spec(target)["containers"]:
                    if name not in c.get("resources", {}).get("requests", {}):
                        rendered.fail(hpa, f"scales on {name} but {c['name']} requests no {name}")


def check_monitoring(rendered: Rendered) -> None:
    """ServiceMonitors find the metrics ports and name jobs; PrometheusRules equal the tested rule file."""
    services = rendered.of_kind("Service")
    for sm in rendered.of_kind("ServiceMonitor"):
        selected = [s for s in services if selects(sm["spec"]["selector"], s["metadata"].get("labels", {}))]
        if not selected:
            rendered.fail(sm, "selects no Service")
        job_label = sm["spec"].get("jobLabel")
        for svc in selected:
            if job_label and svc["metadata"].get("labels", {}).get(job_label) not in SETTINGS_CLASSES:
                rendered.fail(sm, f"Service {svc['metadata']['name']} has no {job_label} naming an imgsearch service")
            names = {p.get("name") for p in svc["spec"]["ports"]}
            for ep in sm["spec"]["endpoints"]:
                if ep.get("port") and ep["port"] not in names:
                    rendered.fail(sm, f"endpoint port {ep['port']} is not a port of Service {svc['metadata']['name']}")
    if rendered.of_kind("ServiceMonitor") and not rendered.of_kind("PrometheusRule"):
        rendered.fail("PrometheusRule", "the operator component must ship the alert rules too")
    tested = yaml.safe_load(RULES_FILE.read_text())["groups"]
    for rule in rendered.of_kind("PrometheusRule"):
        if rule["spec"]["groups"] != tested:
            rendered.fail(
                rule, f"differs from {RULES_FILE.relative_to(ROOT)}: run `python scripts/k8s_validate.py --sync-rules`"
            )
    workloads = [o for o in rendered.objects if o["kind"] in WORKLOAD_KINDS]
    for w in workloads:
        annotations = w["spec"]["template"].get("metadata", {}).get("annotations", {})
        metrics_port = next(
            (
                p["containerPort"]
                for c in pod_spec(w)["containers"]
                for p in c.get("ports", [])
                if p.get("name") == "metrics"
            ),
            None,
        )
        if annotations.get("prometheus.io/scrape") != "true" or annotations.get("prometheus.io/port") != str(
            metrics_port
        ):
            rendered.fail(
                w, f"pod template needs prometheus.io/scrape: 'true' and prometheus.io/port: '{metrics_port}'"
            )


def check_gpu_overlay(rendered: Rendered) -> None:
    """The GPU overlay really puts the encoder on a GPU with the GPU image."""
    encoder = rendered.get("Deployment", "encoder")
    if encoder is None:
        rendered.fail("Deployment/encoder", "missing")
        return
    spec = pod_spec(encoder)
    container = spec["containers"][0]
    if "nvidia.com/gpu" not in container.get("resources", {}).get("limits", {}):
        rendered.fail(encoder, "needs an nvidia.com/gpu limit")
    if not any(t.get("key") == "nvidia.com/gpu" for t in spec.get("tolerations", [])):
        rendered.fail(encoder, "needs a toleration for the nvidia.com/gpu taint")
    if not str(container["image"]).endswith("-gpu"):
        rendered.fail(encoder, f"image {container['image']} is not a -gpu image")
    providers = rendered.env(container).get("IMGSEARCH_ENCODER_PROVIDERS") or ""
    if "CUDAExecutionProvider" not in providers:
        rendered.fail(encoder, "IMGSEARCH_ENCODER_PROVIDERS does not ask for CUDAExecutionProvider")


def check_target(target: str, objects: list[Obj]) -> Rendered:
    rendered = Rendered(target, objects)
    for obj in objects:
        rendered.errors.extend(schema_errors(obj))
    edges: list[Call] = []
    if any(o["kind"] in WORKLOAD_KINDS for o in objects):
        check_workloads(rendered)
        edges = calls(rendered)
        check_network(rendered, edges)
        check_internal_security(rendered, edges)
        check_tagger(rendered)
        check_index(rendered)
        check_services(rendered)
        check_budgets(rendered)
        check_autoscalers(rendered)
        check_monitoring(rendered)
    if target == "overlays/prod-gpu":
        check_gpu_overlay(rendered)
        check_prod_security(rendered, edges)
        check_query_path(rendered)
    if target == "prometheus-adapter":
        cm = rendered.get("ConfigMap", "prometheus-adapter-imgsearch")
        if cm is None or yaml.safe_load(cm["data"]["config.yaml"]) != yaml.safe_load(ADAPTER_CONFIG.read_text()):
            rendered.fail("ConfigMap/prometheus-adapter-imgsearch", f"must carry {ADAPTER_CONFIG.name} unchanged")
    return rendered


def prometheus_rule_text() -> str:
    """The PrometheusRule object for the promtool-tested rule file."""
    groups = yaml.safe_load(RULES_FILE.read_text())["groups"]
    obj = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {"name": "imgsearch", "labels": {"release": "kube-prometheus-stack"}},
        "spec": {"groups": groups},
    }
    header = (
        f"# Generated from {RULES_FILE.relative_to(ROOT)} by `python scripts/k8s_validate.py --sync-rules`;\n"
        "# edit the rule file (and its promtool tests), not this one.\n"
    )
    return header + yaml.safe_dump(obj, sort_keys=False, width=200)


def iter_targets(only: Iterable[str] | None = None) -> Iterator[tuple[str, Path]]:
    for target in only or TARGETS:
        yield target, K8S / target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sync-rules", action="store_true", help="rewrite the PrometheusRule from the rule file")
    parser.add_argument("--target", action="append", help="validate only this target (repeatable)")
    args = parser.parse_args(argv)
    if args.sync_rules:
        PROMETHEUS_RULE.write_text(prometheus_rule_text())
        print(f"wrote {PROMETHEUS_RULE.relative_to(ROOT)}")
        return 0
    failures = 0
    try:
        for target, path in iter_targets(args.target):
            objects = render(path)
            rendered = check_target(target, objects)
            kinds = sorted({o["kind"] for o in objects})
            if rendered.errors:
                failures += len(rendered.errors)
                print(f"FAIL {target}: {len(objects)} objects, {len(rendered.errors)} problem(s)")
                for err in rendered.errors:
                    print(f"  - {err}")
            else:
                print(f"ok   {target}: {len(objects)} objects valid ({', '.join(kinds)})")
    except ToolMissing as exc:
        print(f"k8s-validate: {exc}", file=sys.stderr)
        return 2
    except RuntimeError as exc:
        print(f"k8s-validate: {exc}", file=sys.stderr)
        return 1
    if failures:
        print(f"k8s-validate: {failures} problem(s)", file=sys.stderr)
        return 1
    print(f"k8s-validate: every target valid against Kubernetes {KUBERNETES_VERSION} and imgsearch's rules")
    return 0


if __name__ == "__main__":
    sys.exit(main())
