"""Prometheus RPC metrics (go-grpc-prometheus names) and the /metrics endpoint."""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any, TypeVar
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import Counter, Gauge, Histogram, make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer

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
# Messages of streaming RPCs, as go-grpc-prometheus counts them: one per message read from a client stream and
# one per message written to a server stream (a unary side counts as one message when its RPC handles it).
MSG_RECEIVED = Counter("grpc_server_msg_received_total", "RPC stream messages received on the server.", _LABELS)
MSG_SENT = Counter("grpc_server_msg_sent_total", "RPC stream messages sent by the server.", _LABELS)
RPC_IN_FLIGHT = Gauge("grpc_server_in_flight", "RPCs being handled right now.", _LABELS)
SERVICE_INFO = Gauge("imgsearch_service_info", "Always 1; labels say what runs.", ("service", "version"))
SERVICE_READY = Gauge("imgsearch_service_ready", "1 when the health status is SERVING.", ("service",))


METRICS_PATH = "/metrics"
_NOT_FOUND = b"404 Not Found: metrics are served at /metrics only\n"

T = TypeVar("T")
_StartResponse = Callable[..., Any]


def metrics_only_app(environ: dict[str, Any], start_response: _StartResponse) -> Iterable[bytes]:
    """WSGI app: prometheus_client's exposition at /metrics (and /metrics/), 404 on every other path."""
    if environ.get("PATH_INFO", "") not in (METRICS_PATH, METRICS_PATH + "/"):
        start_response("404 Not Found", [("Content-Type", "text/plain; charset=utf-8")])
        return [_NOT_FOUND]
    return _EXPOSITION(environ, start_response)


_EXPOSITION = make_wsgi_app()


class _QuietHandler(WSGIRequestHandler):
    """No line on stderr per scrape: the JSON logs are the service's only output."""

    def log_message(self, format: str, *args: Any) -> None:
        return None


def start_metrics_server(host: str, port: int) -> int:
    """Serve /metrics (and only /metrics) on its own port in a daemon thread; returns the bound port.

    prometheus_client's own WSGI app answers every path with the metrics; wrapped here so that any other path
    gets 404, served by the same threading WSGI server prometheus_client's start_http_server uses.
    """
    family = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM)[0][0]  # IPv6 hosts such as "::" too

    class _Server(ThreadingWSGIServer):
        address_family = family

    server = make_server(host, port, metrics_only_app, _Server, handler_class=_QuietHandler)
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
    bound = int(server.server_address[1])
    log.info("metrics endpoint listening", extra={"address": f"{host}:{bound}"})
    return bound


async def count_messages(messages: AsyncIterator[T], counter: Counter) -> AsyncIterator[T]:
    """Pass a stream through, adding one to `counter` (e.g. MSG_RECEIVED.labels(...)) per message."""
    async for message in messages:
        counter.inc()
        yield message


def prime(service: str, methods: Iterable[tuple[str, str, str]]) -> None:
    """Create zero-valued series for every method so dashboards and rate() see them before traffic."""
    for svc, method, kind in methods:
        RPC_STARTED.labels(svc, method, kind)
        RPC_LATENCY.labels(svc, method, kind)
        RPC_IN_FLIGHT.labels(svc, method, kind)
        RPC_HANDLED.labels(svc, method, kind, "OK")
        MSG_RECEIVED.labels(svc, method, kind)
        MSG_SENT.labels(svc, method, kind)
    SERVICE_READY.labels(service).set(0)


def labels_for(full_method: str, kind: str) -> tuple[str, str, str]:
    """Split '/pkg.Service/Method' into metric labels."""
    _, svc, method = full_method.split("/", 2) if full_method.count("/") >= 2 else ("", "unknown", full_method)
    return svc, method, kind
