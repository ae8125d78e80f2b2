"""A real Prometheus scrapes the real local stack: every alert rule loads, every dashboard panel has data.

Starts the stack with `python -m imgsearch.devstack up` on free loopback ports, Debian's `prometheus` on a free
port with a 1 s scrape interval and deploy/monitoring's rules, drives traffic through the gateway client
(successes, caller errors, a shard failure), then queries Prometheus' HTTP API.
"""

from __future__ import annotations

import io
import json
import math
import os
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from PIL import Image

from imgsearch.client import GatewayClient, ImageToAdd
from tests.deploy.dashboard import (
    RULES,
    adapter_queries,
    alert_names,
    all_values,
    load_dashboard,
    queries,
    substitute,
    variables,
)
from tests.deploy.helpers import PROMTOOL_HOW, require_binary
from tests.harness import ROOT, free_port, free_port_range

pytestmark = pytest.mark.slow

PROMETHEUS_TEMPLATE = ROOT / "deploy" / "monitoring" / "prometheus" / "prometheus.yml"
# Long enough to cover the whole test: rate() and histogram_quantile() see every call made in it.
RATE_WINDOW = "5m"


@dataclass
class Stack:
    state_dir: Path
    doc: dict[str, Any]

    @property
    def gateway(self) -> str:
        return str(self.doc["gateway"])

    def pid(self, name: str) -> int:
        return int(self.doc["services"][name]["pid"])


def devstack(*args: str, timeout: float = 420) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "imgsearch.devstack", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, model_dir: Path) -> Iterator[Stack]:
    state = tmp_path_factory.mktemp("obs-stack")
    base, metrics_base = free_port_range(20), free_port_range(20)
    up = devstack(
        "up", "--state-dir", str(state), "--port-base", str(base), "--metrics-base", str(metrics_base), "--no-gallery"
    )
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        yield Stack(state, json.loads((state / "stack.json").read_text()))
    finally:
        devstack("down", "--state-dir", str(state), timeout=120)


class Prometheus:
    """A prometheus server process on loopback and a tiny client for its HTTP API."""

    def __init__(self, config: Path, storage: Path, log: Path) -> None:
        binary = require_binary("prometheus", PROMTOOL_HOW)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        with log.open("wb") as out:
            self.proc = subprocess.Popen(
                [
                    binary,
                    f"--config.file={config}",
                    f"--storage.tsdb.path={storage}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                    "--storage.tsdb.retention.time=1h",
                    "--log.level=warn",
                ],
                stdout=out,
                stderr=out,
                stdin=subprocess.DEVNULL,
            )

    def get(self, path: str, **params: str) -> Any:
        url = f"{self.url}{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        with urllib.request.urlopen(url, timeout=10) as resp:
            body = json.loads(resp.read())
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        data = self.get("/api/v1/query", query=expr)
        assert data["resultType"] == "vector", (expr, data["resultType"])
        result: list[dict[str, Any]] = data["result"]
        return result

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"prometheus exited: {self.log.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as resp:
                    if resp.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"prometheus not ready: {self.log.read_text()[-2000:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def prometheus_config(stack: Stack, path: Path) -> None:
    """deploy/monitoring/prometheus/prometheus.yml with the stack's metrics addresses and 1 s scrapes."""
    config = yaml.safe_load(PROMETHEUS_TEMPLATE.read_text())
    config["global"].update({"scrape_interval": "1s", "evaluation_interval": "1s", "scrape_timeout": "1s"})
    config["rule_files"] = [str(RULES)]
    services = stack.doc["services"]
    for job in config["scrape_configs"]:
        for group in job["static_configs"]:
            # The template's pod label names the process (encoder-0, index-1, ...): fill in its address.
            name = group["labels"]["pod"]
            name = name if name in services else name.rsplit("-", 1)[0]
            group["targets"] = [services[name]["metrics"]]
    path.write_text(yaml.safe_dump(config))


@pytest.fixture(scope="module")
def prometheus(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Prometheus]:
    work = tmp_path_factory.mktemp("prometheus")
    prometheus_config(stack, work / "prometheus.yml")
    promtool = require_binary("promtool", PROMTOOL_HOW)
    check = subprocess.run(
        [promtool, "check", "config", str(work / "prometheus.yml")], capture_output=True, text=True, check=False
    )
    assert check.returncode == 0, check.stdout + check.stderr
    prom = Prometheus(work / "prometheus.yml", work / "data", work / "prometheus.log")
    try:
        prom.wait_ready()
        yield prom
    finally:
        prom.stop()


def eventually(check: Callable[[], Any], timeout: float, what: str) -> Any:
    """Retry until check returns something truthy without raising; then return it."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        try:
            last = check()
            if last:
                return last
        except AssertionError as exc:
            last = exc
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: still not true after {timeout:.0f}s (last: {last})")
        time.sleep(0.5)


def photo(sample: bytes, size: int) -> bytes:
    buf = io.BytesIO()
    Image.open(io.BytesIO(sample)).convert("RGB").resize((size, size)).save(buf, format="JPEG")
    return buf.getvalue()


def expect_error(call: Callable[[], Any], code: grpc.StatusCode) -> None:
    with pytest.raises(grpc.RpcError) as err:
        call()
    assert err.value.code() == code  # type: ignore[attr-defined]


def scrape_barrier(prometheus: Prometheus) -> None:
    """Wait until every target has been scraped after this moment.

    Counters and histograms with labels appear on their first use; rate() cannot count the increase that
    brought a series into existence, so each kind of traffic runs once, is scraped, then runs again.
    """
    now = time.time()

    def scraped() -> bool:
        stamps = [float(s["value"][1]) for s in prometheus.query("timestamp(up)")]
        return len(stamps) == 5 and min(stamps) > now

    eventually(scraped, 30, "a scrape of every target after the traffic")


def use_everything(client: GatewayClient, images: list[ImageToAdd], sample_photos: dict[str, bytes]) -> None:
    """One round of real use: adds, every kind of search, tagging, tag changes, reads, caller mistakes."""
    assert all(o.ok for o in client.add_images(images))
    for query in ("a cat", "a cup of coffee", "a rocket launch", "a horse"):
        assert client.search_text(query, k=3).hits
    assert client.search_image(images[0].data, k=3).hits
    assert client.similar("cat", k=3).hits
    assert client.tag(sample_photos["cat"], k=5).tags
    assert all(o.ok for o in client.add_tags(["feline", "espresso"]))
    assert list(client.list_tags("unseen"))
    assert all(o.ok for o in client.remove_tags(["espresso"]))
    client.get_images(["cat", "coffee"])
    outcomes, _partial = client.delete_images(["horse"])
    assert outcomes[0].ok
    # Caller mistakes: a non-image, a broken PNG, an empty query, an unknown id (non-OK codes, decode failures).
    expect_error(lambda: client.search_image(b"definitely not an image", k=3), grpc.StatusCode.INVALID_ARGUMENT)
    expect_error(lambda: client.tag(b"\x89PNG\r\n\x1a\n broken", k=3), grpc.StatusCode.INVALID_ARGUMENT)
    expect_error(lambda: client.search_text("", k=3), grpc.StatusCode.INVALID_ARGUMENT)
    expect_error(lambda: client.similar("no-such-image", k=3), grpc.StatusCode.NOT_FOUND)


@pytest.fixture(scope="module")
def traffic(stack: Stack, prometheus: Prometheus, sample_photos: dict[str, bytes]) -> Stack:
    """Real use through the gateway, twice; then index-1 dies and searches go on without it."""
    eventually(lambda: len(prometheus.query("up == 1")) == 5, 60, "all five targets up")
    images = [ImageToAdd(photo(data, 256 + 16 * i), name, {"source": "skimage"}) for i, (name, data) in
              enumerate(sorted(sample_photos.items()))]  # fmt: skip
    with GatewayClient(stack.gateway, timeout=120) as client:
        use_everything(client, images, sample_photos)
        scrape_barrier(prometheus)
        use_everything(client, images, sample_photos)
        scrape_barrier(prometheus)
        # What a lost node looks like: index-1 is killed (its last counters are already scraped).
        assert prometheus.query('imgsearch_index_writes_total{shard="index-1",op="upsert"} > 0')
        os.kill(stack.pid("index-1"), signal.SIGKILL)
        for _ in range(2):
            for query in ("a cat", "a rocket"):
                assert client.search_text(query, k=3).partial
            scrape_barrier(prometheus)
    return stack


def test_every_alert_rule_loads_and_evaluates(prometheus: Prometheus) -> None:
    def loaded() -> dict[str, dict[str, Any]]:
        groups = prometheus.get("/api/v1/rules", type="alert")["groups"]
        rules = {r["name"]: r for g in groups for r in g["rules"]}
        assert set(rules) == set(alert_names()), sorted(rules)
        unhealthy = {n: (r["health"], r.get("lastError")) for n, r in rules.items() if r["health"] != "ok"}
        assert not unhealthy, unhealthy
        return rules

    rules = eventually(loaded, 30, "every alert rule evaluated with health ok")
    assert len(rules) == 10


def test_every_dashboard_panel_returns_data(traffic: Stack, prometheus: Prometheus) -> None:
    dash = load_dashboard()
    values = all_values(dash, __rate_interval=RATE_WINDOW, __interval="1s")
    pending = {f"{q.panel} [{q.ref_id}]": substitute(q.expr, values) for q in queries(dash)}

    def finite_series(expr: str) -> bool:
        return any(math.isfinite(float(s["value"][1])) for s in prometheus.query(expr))

    def all_have_data() -> bool:
        for name, expr in list(pending.items()):
            if finite_series(expr):
                del pending[name]
        assert not pending, f"panels without data: {pending}"
        return True

    eventually(all_have_data, 60, "every dashboard panel query returns a finite series")


def test_dashboard_variables_offer_every_service_and_shard(traffic: Stack, prometheus: Prometheus) -> None:
    dash = load_dashboard()
    options: dict[str, list[str]] = {}
    for name, var in variables(dash).items():
        if var["type"] != "query":
            continue
        # label_values(metric{selector}, label): what Grafana lists for the variable.
        query = substitute(var["query"]["query"], all_values(dash))
        inner = query[len("label_values(") : -1]
        metric, label = (part.strip() for part in inner.rsplit(",", 1))
        options[name] = prometheus.get(f"/api/v1/label/{label}/values", **{"match[]": metric})
    assert set(options["service"]) == {"encoder", "tagger", "index", "gateway"}
    assert {"SearchByText", "AddImages", "EncodeImages", "RankTags", "Search"} <= set(options["method"])
    assert {"index-0", "index-1"} <= set(options["shard"])


def test_autoscaling_metrics_exist_per_pod(traffic: Stack, prometheus: Prometheus) -> None:
    """The prometheus-adapter queries behind the HPAs return one finite value per pod."""
    gateway = adapter_queries('namespace="local",pod=~"gateway-0"', "pod")["imgsearch_grpc_in_flight"]
    result = prometheus.query(gateway)
    assert [s["metric"]["pod"] for s in result] == ["gateway-0"]
    encoder = adapter_queries('namespace="local",pod=~"encoder-0"', "pod")["imgsearch_encoder_queue_mean_seconds"]
    (series,) = eventually(lambda: prometheus.query(encoder), 30, "encoder queue metric")
    assert series["metric"]["pod"] == "encoder-0" and math.isfinite(float(series["value"][1]))


def test_losing_a_shard_raises_its_alerts(traffic: Stack, prometheus: Prometheus) -> None:
    """index-1 was killed: the shard-missing and target-down alerts go pending for exactly that shard."""

    def pending_for_index_1() -> bool:
        alerts = prometheus.get("/api/v1/alerts")["alerts"]
        states = {(a["labels"]["alertname"], a["labels"].get("shard") or a["labels"].get("pod")): a for a in alerts}
        assert ("ImgsearchIndexShardMissing", "index-1") in states, sorted(states)
        assert ("ImgsearchTargetDown", "index-1") in states, sorted(states)
        assert ("ImgsearchIndexShardMissing", "index-0") not in states
        return all(a["state"] in {"pending", "firing"} for a in states.values())

    eventually(pending_for_index_1, 30, "alerts for the lost shard")
    partial = prometheus.query('sum(imgsearch_gateway_partial_results_total{method="SearchByText"})')
    assert partial and float(partial[0]["value"][1]) >= 2
