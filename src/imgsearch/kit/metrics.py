"""Prometheus RPC metrics (go-grpc-prometheus names) and the /metrics endpoint."""

from __future__ import annotations

import logging
from collections.abc import Iterable

from prometheus_client import Counter, Gauge, Histogram, start_http_server

log = logging.getLogger(__name__)

# Buckets from 1 ms to 30 s: fast index lookups and slow CPU batch encodes share one histogram.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_LABELS = ("grpc_service", "grpc_method", "grpc_type")

RPC_STARTED = Counter("grpc_server_started_total", "RPCs started on the server.", _LABELS)
RPC_HANDLED = Counter(
    "grpc_server_handled_total", "RPCs completed on the server, by status code.", (*_LABELS, "grpc_code")
)
RPC_LATENCY = Histogram(
    "grpc_server_handling_seconds",
    "Time from receiving an RPC to sending its status.",
    _LABELS,
    buckets=LATENCY_BUCKETS,
)
RPC_IN_FLIGHT = Gauge("grpc_server_in_flight", "RPCs being handled right now.", _LABELS)
SERVICE_INFO = Gauge("imgsearch_service_info", "Always 1; labels say what runs.", ("service", "version"))
SERVICE_READY = Gauge("imgsearch_service_ready", "1 when the health status is SERVING.", ("service",))


def start_metrics_server(host: str, port: int) -> int:
    """Serve /metrics on its own port in a daemon thread; returns the bound port."""
    server, _thread = start_http_server(port, addr=host)
    bound = int(server.server_address[1])
    log.info("metrics endpoint listening", extra={"address": f"{host}:{bound}"})
    return bound


def prime(service: str, methods: Iterable[tuple[str, str, str]]) -> None:
    """Create zero-valued series for every method so dashboards and rate() see them before traffic."""
    for svc, method, kind in methods:
        RPC_STARTED.labels(svc, method, kind)
        RPC_LATENCY.labels(svc, method, kind)
        RPC_IN_FLIGHT.labels(svc, method, kind)
        RPC_HANDLED.labels(svc, method, kind, "OK")
    SERVICE_READY.labels(service).set(0)


def labels_for(full_method: str, kind: str) -> tuple[str, str, str]:
    """Split '/pkg.Service/Method' into metric labels."""
    _, svc, method = full_method.split("/", 2) if full_method.count("/") >= 2 else ("", "unknown", full_method)
    return svc, method, kind
