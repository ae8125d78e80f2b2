"""Alert rules, their promtool unit tests, the Prometheus config and the Grafana dashboard, checked with promtool."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import yaml

from tests.deploy.dashboard import (
    ADAPTER_CONFIG,
    DASHBOARD,
    MONITORING,
    RULE_TESTS,
    RULES,
    adapter_queries,
    alert_names,
    all_values,
    load_dashboard,
    panels,
    queries,
    substitute,
    variables,
)


def run(cmd: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)


def test_rules_pass_promtool_check(promtool: str) -> None:
    proc = run([promtool, "check", "rules", str(RULES)])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"SUCCESS: {len(alert_names())} rules found" in proc.stdout


def test_rule_unit_tests_pass(promtool: str) -> None:
    files = sorted(RULE_TESTS.glob("*.yml"))
    assert files, f"no promtool tests in {RULE_TESTS}"
    proc = run([promtool, "test", "rules", *map(str, files)])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS" in proc.stdout


def test_a_broken_expectation_fails(promtool: str, tmp_path: Path) -> None:
    """The unit tests compare labels exactly: a wrong expectation must make promtool fail."""
    text = (RULE_TESTS / "imgsearch_test.yml").read_text()
    broken = text.replace("instance: 10.0.0.1:9101", "instance: 10.0.0.2:9101", 1)
    assert broken != text
    (tmp_path / "rules").mkdir()
    (tmp_path / "rules" / RULES.name).write_text(RULES.read_text())
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "t.yml").write_text(broken)
    proc = run([promtool, "test", "rules", str(tmp_path / "tests" / "t.yml")])
    assert proc.returncode != 0
    assert "ImgsearchTargetDown" in proc.stdout + proc.stderr


def test_every_alert_has_a_firing_and_a_quiet_case() -> None:
    firing: set[str] = set()
    quiet: set[str] = set()
    for path in RULE_TESTS.glob("*.yml"):
        for case in yaml.safe_load(path.read_text())["tests"]:
            for check in case.get("alert_rule_test", []):
                (firing if check.get("exp_alerts") else quiet).add(check["alertname"])
    names = set(alert_names())
    assert names - firing == set(), f"alerts never tested firing: {sorted(names - firing)}"
    assert names - quiet == set(), f"alerts never tested quiet: {sorted(names - quiet)}"
    expected = {
        "ImgsearchTargetDown",
        "ImgsearchGatewayAbsent",
        "ImgsearchServiceNotReady",
        "ImgsearchIndexShardMissing",
        "ImgsearchHighErrorRatio",
        "ImgsearchPartialResults",
        "ImgsearchHighLatencyP99",
        "ImgsearchEncoderQueueing",
        "ImgsearchIndexSnapshotStale",
        "ImgsearchIndexBuildBehind",
    }
    assert names == expected


def test_every_alert_has_severity_summary_and_description() -> None:
    for group in yaml.safe_load(RULES.read_text())["groups"]:
        for rule in group["rules"]:
            assert rule["labels"]["severity"] in {"critical", "warning"}, rule["alert"]
            assert rule["annotations"]["summary"] and rule["annotations"]["description"], rule["alert"]
            assert rule.get("for"), f"{rule['alert']} fires on a single evaluation"


def test_local_prometheus_config_is_valid(promtool: str) -> None:
    proc = run([promtool, "check", "config", str(MONITORING / "prometheus" / "prometheus.yml")])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    config = yaml.safe_load((MONITORING / "prometheus" / "prometheus.yml").read_text())
    assert {j["job_name"] for j in config["scrape_configs"]} == {"encoder", "tagger", "index", "gateway"}


def _as_recording_rules(exprs: dict[str, str], path: Path) -> None:
    rules = [{"record": f"imgsearch:check_{i}", "expr": e} for i, e in enumerate(exprs.values())]
    path.write_text(yaml.safe_dump({"groups": [{"name": "syntax", "rules": rules}]}))


def test_every_dashboard_query_parses(promtool: str, tmp_path: Path) -> None:
    """promtool parses each panel query (as a recording rule) after Grafana's variables are filled in."""
    dash = load_dashboard()
    values = all_values(dash)
    exprs = {f"{q.panel}/{q.ref_id}": substitute(q.expr, values) for q in queries(dash)}
    assert len(exprs) >= 25
    for name, expr in exprs.items():
        assert "$" not in expr, f"{name}: unsubstituted variable in {expr}"
    _as_recording_rules(exprs, tmp_path / "dashboard.yml")
    proc = run([promtool, "check", "rules", str(tmp_path / "dashboard.yml")])
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_a_broken_dashboard_query_is_caught(promtool: str, tmp_path: Path) -> None:
    _as_recording_rules({"bad": "sum by (job (rate(up[1m]))"}, tmp_path / "bad.yml")
    assert run([promtool, "check", "rules", str(tmp_path / "bad.yml")]).returncode != 0


def test_adapter_queries_parse(promtool: str, tmp_path: Path) -> None:
    exprs = adapter_queries('namespace="imgsearch",pod=~"gateway-.*"', "pod")
    assert set(exprs) == {"imgsearch_grpc_in_flight", "imgsearch_encoder_queue_mean_seconds"}
    _as_recording_rules(exprs, tmp_path / "adapter.yml")
    proc = run([promtool, "check", "rules", str(tmp_path / "adapter.yml")])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert ADAPTER_CONFIG.exists()


def test_dashboard_structure() -> None:
    """What Grafana needs to import it: unique ids, a sane grid, datasource variable, known variables."""
    dash = load_dashboard()
    assert dash["uid"] == "imgsearch-overview" and dash["title"]
    ids = [p["id"] for p in dash["panels"]] + [q["id"] for p in dash["panels"] for q in p.get("panels", [])]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    defined = set(variables(dash))
    assert {"datasource", "service", "method", "shard"} <= defined
    assert variables(dash)["datasource"]["type"] == "datasource"
    for p in dash["panels"]:
        grid = p["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, p["title"]
    for p in panels(dash):
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        assert p.get("targets"), f"panel {p['title']} has no query"
        for t in p["targets"]:
            used = set(re.findall(r"\$\{?(\w+)", t["expr"]))
            assert used - defined - {"__rate_interval", "__interval", "__range"} == set(), (p["title"], used)
    titles = " ".join(p["title"].lower() for p in panels(dash))
    for topic in (
        "requests",
        "error",
        "p50",
        "p95",
        "p99",
        "batch",
        "items encoded",
        "vectors",
        "vocabulary",
        "partial",
        "search latency",
    ):
        assert topic in titles, f"no panel about {topic}"


def test_grafana_provisioning_points_at_the_dashboard() -> None:
    ds: dict[str, Any] = yaml.safe_load((MONITORING / "grafana/provisioning/datasources/imgsearch.yml").read_text())
    assert ds["datasources"][0]["type"] == "prometheus"
    provider = yaml.safe_load((MONITORING / "grafana/provisioning/dashboards/imgsearch.yml").read_text())
    assert provider["providers"][0]["type"] == "file"
    assert provider["providers"][0]["options"]["path"].startswith("/var/lib/grafana/dashboards")
    assert DASHBOARD.suffix == ".json"
