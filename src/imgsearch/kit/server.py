"""Run a grpc.aio server with health, reflection, metrics, JSON logs and graceful SIGTERM drain."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import grpc
from grpc import aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from threadpoolctl import threadpool_limits  # type: ignore[import-untyped]

from imgsearch.kit import metrics, tls, tracing
from imgsearch.kit.auth import TokenFileError, internal_auth_interceptor
from imgsearch.kit.logs import setup_logging
from imgsearch.kit.rpc import ServerInterceptor
from imgsearch.kit.settings import ServerSettings

log = logging.getLogger(__name__)

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


async def _nothing() -> None:
    return None


@dataclass
class ServiceApp:
    """What a service plugs into the kit: its servicers, and how it starts and stops."""

    name: str
    # Fully-qualified proto service names, for health and reflection.
    service_names: list[str]
    register: Callable[[aio.Server], None]
    # Loads models/index; the health status turns SERVING only once it returns.
    startup: Callable[[], Awaitable[None]] = _nothing
    # Runs after in-flight calls drained: flush, snapshot, close.
    shutdown: Callable[[], Awaitable[None]] = _nothing
    # Runs when draining starts, before in-flight calls are awaited: stop other listeners (HTTP), end
    # long-lived streams that would otherwise hold the drain for the whole grace period.
    draining: Callable[[], Awaitable[None]] = _nothing
    # gRPC methods to pre-create metric series for: (service, method, kind).
    methods: list[tuple[str, str, str]] = field(default_factory=list)
    version: str = "0.1.0"
    server_credentials: grpc.ServerCredentials | None = None
    # Extra interceptors (e.g. the gateway's public bearer tokens), run inside the tracing, logging/metrics and
    # internal-token ones, so their refusals are traced, counted and logged like any other status.
    interceptors: list[aio.ServerInterceptor] = field(default_factory=list)
    # With INTERNAL_TOKEN_FILE set, require the internal token on this server's RPCs. The public edge (the
    # gateway) sets False: its callers carry public tokens; it still sends the internal token to its peers.
    internal_auth: bool = True


def methods_of(service_descriptor: object) -> list[tuple[str, str, str]]:
    """(service, method, kind) for every RPC of a protobuf ServiceDescriptor."""
    out = []
    for m in service_descriptor.methods:  # type: ignore[attr-defined]
        kind = {
            (False, False): "unary",
            (True, False): "client_stream",
            (False, True): "server_stream",
            (True, True): "bidi_stream",
        }[(m.client_streaming, m.server_streaming)]
        out.append((service_descriptor.full_name, m.name, kind))  # type: ignore[attr-defined]
    return out


class Runner:
    """One server's life: bind, start, load, serve, drain."""

    def __init__(self, app: ServiceApp, settings: ServerSettings) -> None:
        self.app = app
        self.settings = settings
        self.health = health.aio.HealthServicer()
        self.stopping = asyncio.Event()
        self.port = 0
        self.metrics_port = 0
        self.health_port = 0
        self.health_server: aio.Server | None = None
        options = [
            ("grpc.max_receive_message_length", settings.max_message_bytes),
            ("grpc.max_send_message_length", settings.max_message_bytes),
            ("grpc.so_reuseport", 0),
            # Clients re-resolve and rebalance when a connection ages out: autoscaled pods get traffic.
            # The grace lets a long AddImages stream already in flight finish on the old connection.
            ("grpc.max_connection_age_ms", 300_000),
            ("grpc.max_connection_age_grace_ms", 600_000),
        ]
        # Every service gets tracing and internal authentication from its settings, without code of its own.
        tracing.setup_tracing(app.name)
        limit_blas_threads(settings.blas_threads)
        try:
            internal = internal_auth_interceptor(settings.internal_token_file) if app.internal_auth else None
        except TokenFileError as exc:
            raise SystemExit(f"imgsearch-{app.name}: {exc}") from None
        # Outermost first: the span is open while the access line is written (so it carries the trace id), and
        # refusals by the token interceptors below are counted and logged like any other status.
        interceptors: list[aio.ServerInterceptor] = [
            tracing.server_interceptor(),
            ServerInterceptor(settings.access_log_level, app.name),
            *([internal] if internal is not None else []),
            *app.interceptors,
        ]
        self.server = aio.server(
            interceptors=interceptors,
            options=options,
            maximum_concurrent_rpcs=settings.max_concurrent_rpcs,
        )

    async def _set_health(self, status: health_pb2.HealthCheckResponse.ServingStatus.ValueType) -> None:
        for name in ["", *self.app.service_names]:
            await self.health.set(name, status)
        metrics.SERVICE_READY.labels(self.app.name).set(1 if status == SERVING else 0)

    async def start(self) -> None:
        self.app.register(self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            [*self.app.service_names, health.SERVICE_NAME, reflection.SERVICE_NAME], self.server
        )
        await self._set_health(NOT_SERVING)
        address = f"{self.settings.host}:{self.settings.port}"
        # An app's own credentials win; otherwise TLS_CERT_FILE/TLS_KEY_FILE turn TLS on.
        try:
            credentials = self.app.server_credentials or tls.server_credentials(self.settings)
        except tls.TLSConfigError as exc:
            raise SystemExit(f"imgsearch-{self.app.name}: {exc}") from None
        if credentials is not None:
            self.port = self.server.add_secure_port(address, credentials)
        else:
            self.port = self.server.add_insecure_port(address)
        if self.port == 0:
            raise SystemExit(f"imgsearch-{self.app.name}: cannot bind {address}")
        if self.settings.health_port is not None:
            # Only the health service listens here: probes reach it without TLS, callers cannot.
            self.health_server = aio.server()
            health_pb2_grpc.add_HealthServicer_to_server(self.health, self.health_server)
            health_address = f"{self.settings.host}:{self.settings.health_port}"
            self.health_port = self.health_server.add_insecure_port(health_address)
            if self.health_port == 0:
                raise SystemExit(f"imgsearch-{self.app.name}: cannot bind {health_address}")
            await self.health_server.start()
        metrics.SERVICE_INFO.labels(self.app.name, self.app.version).set(1)
        metrics.prime(self.app.name, self.app.methods)
        self.metrics_port = metrics.start_metrics_server(self.settings.metrics_host, self.settings.metrics_port)
        await self.server.start()
        log.info(
            "listening",
            extra={
                "address": f"{self.settings.host}:{self.port}",
                "metrics_port": self.metrics_port,
                "tls": credentials is not None,
                "internal_auth": self.app.internal_auth and self.settings.internal_token_file is not None,
            },
        )

    async def load(self) -> None:
        """Run the app's startup, then report SERVING."""
        await self.app.startup()
        await self._set_health(SERVING)
        log.info("ready: health SERVING")

    async def drain(self) -> None:
        """Stop taking calls, let in-flight ones finish within the grace period, then shut down."""
        log.info("draining", extra={"grace_seconds": self.settings.grace_seconds})
        await self._set_health(NOT_SERVING)
        # The app's own listeners drain beside gRPC; a failure there must not cut the gRPC drain short, so
        # in-flight calls always get their whole grace period before shutdown runs.
        draining: asyncio.Future[None] = asyncio.ensure_future(self.app.draining())
        await self.server.stop(self.settings.grace_seconds)
        try:
            await draining
        except Exception:
            log.exception("draining the app's other listeners failed")
        if self.health_server is not None:
            await self.health_server.stop(0)
        await self.app.shutdown()
        tracing.flush_tracing()
        log.info("stopped")


async def serve(app: ServiceApp, settings: ServerSettings) -> None:
    """Serve until SIGTERM or SIGINT, then drain gracefully."""
    runner = Runner(app, settings)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, runner.stopping.set)
    await runner.start()
    load_task = asyncio.create_task(runner.load())
    stop_task = asyncio.create_task(runner.stopping.wait())
    done, _ = await asyncio.wait({load_task, stop_task}, return_when=asyncio.FIRST_COMPLETED)
    if load_task in done and load_task.exception() is not None:
        log.error("startup failed", exc_info=load_task.exception())
        await runner.server.stop(0)
        await app.shutdown()
        raise SystemExit(1)
    if not stop_task.done():
        await stop_task
    if not load_task.done():
        load_task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await load_task
    await runner.drain()


def run(app_factory: Callable[[], tuple[ServiceApp, ServerSettings]]) -> None:
    """Entry point for `python -m imgsearch.<service>`."""

    async def main() -> None:
        # Built inside the loop: grpc.aio channels to peers bind to the loop that creates them.
        app, settings = app_factory()
        setup_logging(app.name, settings.log_level)
        await serve(app, settings)

    asyncio.run(main())


def limit_blas_threads(threads: int) -> None:
    """Cap every BLAS library loaded in this process (numpy's, FAISS's) at `threads`; 0 leaves them as they are.

    threadpoolctl rather than OPENBLAS_NUM_THREADS: it works after numpy is imported and finds each library
    whichever way it was linked.
    """
    if threads > 0:
        threadpool_limits(limits=threads, user_api="blas")
