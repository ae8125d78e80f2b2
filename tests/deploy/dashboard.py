"""Read the Grafana dashboard and the alert rules as data: panel queries with Grafana's variables filled in."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from tests.deploy.helpers import ROOT

MONITORING = ROOT / "deploy" / "monitoring"
DASHBOARD = MONITORING / "grafana" / "dashboards" / "imgsearch.json"
RULES = MONITORING / "rules" / "imgsearch.rules.yml"
RULE_TESTS = MONITORING / "tests"
ADAPTER_CONFIG = ROOT / "deploy" / "k8s" / "prometheus-adapter" / "config.yaml"
# Grafana's built-in interval variables, as Grafana would fill them for a 1h range and 15 s scrapes
# (tests with faster scrapes pass their own).
BUILTINS = {"__rate_interval": "1m", "__interval": "15s", "__range": "1h", "__range_s": "3600"}
_VAR = re.compile(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)|\[\[(\w+)\]\]")


@dataclass(frozen=True)
class PanelQuery:
    """One query of one panel."""

    panel: str
    ref_id: str
    expr: str


def load_dashboard(path: Path = DASHBOARD) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(path.read_text())
    return data


def panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    """Every panel, rows' nested panels included, rows themselves excluded."""
    out: list[dict[str, Any]] = []
    for p in dashboard["panels"]:
        if p.get("type") == "row":
            out.extend(p.get("panels", []))
        else:
            out.append(p)
    return out


def queries(dashboard: dict[str, Any]) -> list[PanelQuery]:
    return [
        PanelQuery(p["title"], t["refId"], t["expr"])
        for p in panels(dashboard)
        for t in p.get("targets", [])
        if t.get("expr")
    ]


def variables(dashboard: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {v["name"]: v for v in dashboard.get("templating", {}).get("list", [])}


def substitute(expr: str, values: dict[str, str]) -> str:
    """Replace $var, ${var}, ${var:fmt} and [[var]] as Grafana does; unknown variables raise KeyError."""

    def repl(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(2) or m.group(3)
        return values[name]

    return _VAR.sub(repl, expr)


def all_values(dashboard: dict[str, Any], **builtins: str) -> dict[str, str]:
    """Each query variable set to "All" (its allValue regex), plus Grafana's interval built-ins."""
    values = {**BUILTINS, **builtins}
    for name, var in variables(dashboard).items():
        if var["type"] == "query":
            values[name] = var.get("allValue") or ".*"
    return values


def alert_names() -> list[str]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [r["alert"] for g in groups for r in g["rules"] if "alert" in r]


def adapter_queries(label_matchers: str, group_by: str) -> dict[str, str]:
    """prometheus-adapter's metricsQuery per exposed metric, rendered as the adapter renders its template."""
    config = yaml.safe_load(ADAPTER_CONFIG.read_text())
    out = {}
    for rule in config["rules"]:
        series = re.match(r"^\s*([a-zA-Z_:][a-zA-Z0-9_:]*)", rule["seriesQuery"])
        assert series is not None, rule["seriesQuery"]
        query = (
            rule["metricsQuery"]
            .replace("<<.Series>>", series.group(1))
            .replace("<<.LabelMatchers>>", label_matchers)
            .replace("<<.GroupBy>>", group_by)
        )
        out[rule["name"]["as"]] = query
    return out
