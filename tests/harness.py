"""Start real imgsearch servers as subprocesses on loopback for tests, and wait for SERVING."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from imgsearch.devstack import free_port_range

__all__ = ["ServiceProcess", "free_port", "free_port_range", "health_status"]

ROOT = Path(__file__).resolve().parent.parent
MODEL_DIR = Path(os.environ.get("IMGSEARCH_MODEL_DIR", ROOT / "models")).resolve()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def health_status(address: str, timeout: float = 1.0) -> int | None:
    """The overall health status of a server, or None if it does not answer."""
    with grpc.insecure_channel(address) as ch:
        try:
            resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout)
        except grpc.RpcError:
            return None
        return int(resp.status)


@dataclass
class ServiceProcess:
    """One server (python -m imgsearch.<service>) running as a child process."""

    service: str
    env: dict[str, str] = field(default_factory=dict)
    log_path: Path | None = None
    port: int = 0
    metrics_port: int = 0
    proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def start(self, wait: bool = True, timeout: float = 120.0) -> ServiceProcess:
        if not self.port:
            self.port = free_port()
        if not self.metrics_port:
            self.metrics_port = free_port()
        prefix = f"IMGSEARCH_{self.service.upper()}_"
        env = {**os.environ, "IMGSEARCH_MODEL_DIR": str(MODEL_DIR), "PYTHONUNBUFFERED": "1"}
        env.update(
            {
                prefix + "HOST": "127.0.0.1",
                prefix + "PORT": str(self.port),
                prefix + "METRICS_HOST": "127.0.0.1",
                prefix + "METRICS_PORT": str(self.metrics_port),
            }
        )
        env.update(self.env)
        out = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, "-m", f"imgsearch.{self.service}"], env=env, stdout=out, stderr=out
        )
        if wait:
            self.wait_serving(timeout)
        return self

    def wait_serving(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"{self.service} exited with {self.proc.returncode}; log: {self.log_tail()}")
            if health_status(self.address) == health_pb2.HealthCheckResponse.SERVING:
                return
            time.sleep(0.1)
        raise TimeoutError(f"{self.service} not SERVING after {timeout}s; log: {self.log_tail()}")

    def log_tail(self, n: int = 3000) -> str:
        if self.log_path and self.log_path.exists():
            return self.log_path.read_text(errors="replace")[-n:]
        return "(no log)"

    def stop(self, timeout: float = 20.0) -> int | None:
        """SIGTERM (graceful drain), then SIGKILL if it does not exit in time."""
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()

    def kill(self) -> None:
        """SIGKILL: no drain, no flush: what a crash looks like."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def restart(self, timeout: float = 120.0) -> ServiceProcess:
        self.stop()
        return self.start(timeout=timeout)
