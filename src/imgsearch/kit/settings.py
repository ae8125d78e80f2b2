"""Typed settings base: every server reads IMGSEARCH_<SERVICE>_* environment variables into one object."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Literal, TypeVar

from pydantic import Field, FilePath, ValidationError, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

S = TypeVar("S", bound="ServerSettings")


class ServerSettings(BaseSettings):
    """Settings every server has; subclasses set env_prefix and add their own fields."""

    model_config = SettingsConfigDict(env_prefix="IMGSEARCH_", extra="ignore", frozen=True)

    host: str = Field("127.0.0.1", description="address the gRPC server binds")
    port: int = Field(50051, ge=0, le=65535, description="gRPC port (0 picks a free one)")
    metrics_host: str = Field("127.0.0.1", description="address of the Prometheus /metrics endpoint")
    metrics_port: int = Field(9090, ge=0, le=65535, description="Prometheus port (0 picks a free one)")
    log_level: str = Field("INFO", description="DEBUG, INFO, WARNING or ERROR")
    max_message_mb: int = Field(64, ge=1, le=1024, description="largest gRPC message accepted or sent")
    grace_seconds: float = Field(10.0, ge=0, description="SIGTERM: how long in-flight calls may finish")
    max_concurrent_rpcs: int | None = Field(None, ge=1, description="beyond this, calls get RESOURCE_EXHAUSTED")
    peer_timeout_seconds: float = Field(10.0, gt=0, description="deadline for calls to peers when the caller set none")
    # One BLAS thread per process: a server's concurrency is its event loop, its processes and its replicas. More
    # BLAS threads spin-wait between small products and take the CPU from the other services on the node (the
    # gateway spent 4 ms of CPU per added image projecting batches of 16 with 2 threads, 0.7 ms with one).
    blas_threads: int = Field(1, ge=0, description="BLAS threads (numpy, FAISS) per process; 0: the library default")
    # TLS is opt-in: internal traffic stays plaintext unless these are set (see docs/deploy.md).
    tls_cert_file: FilePath | None = Field(None, description="PEM certificate chain; with TLS_KEY_FILE, serve TLS")
    tls_key_file: FilePath | None = Field(
        None, validate_default=True, description="PEM private key of TLS_CERT_FILE; set both or neither"
    )
    tls_client_ca_file: FilePath | None = Field(
        None, description="PEM CA bundle; when set, clients must present a certificate it signed (mTLS)"
    )
    peer_tls_ca_file: FilePath | None = Field(
        None, description="PEM CA bundle to verify peers with; when set, calls to peers use TLS"
    )
    peer_tls_cert_file: FilePath | None = Field(
        None, description="PEM client certificate presented to peers that require mTLS"
    )
    peer_tls_key_file: FilePath | None = Field(
        None, validate_default=True, description="PEM private key of PEER_TLS_CERT_FILE; set both or neither"
    )
    # Kubelet gRPC probes cannot speak TLS, so a TLS server needs a plaintext health-only listener.
    health_port: int | None = Field(
        None, ge=0, le=65535, description="extra plaintext port serving only grpc.health.v1 (for TLS servers' probes)"
    )

    # One shared secret for service-to-service calls (see kit/auth.py): servers require it, peer channels send it.
    internal_token_file: FilePath | None = Field(
        None,
        description=(
            "internal bearer tokens, one per line (several during a rotation); when set, every RPC but health and"
            " reflection needs one of them, and calls to peers send the first line"
        ),
    )
    access_log_level: Literal["DEBUG", "INFO", "WARNING", "OFF"] = Field(
        "INFO",
        description=(
            "level of the one log line per successful RPC (OFF: none); failed RPCs are always logged, client"
            " errors at INFO, unavailable peers and deadlines at WARNING, server faults at ERROR"
        ),
    )

    @field_validator("tls_key_file", "peer_tls_key_file")
    @classmethod
    def _cert_and_key_together(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        # Fields validate in order, so the matching *_cert_file is in info.data unless it failed itself.
        key_field = str(info.field_name)
        cert_field = key_field.replace("_key_file", "_cert_file")
        if cert_field in info.data and (value is None) != (info.data[cert_field] is None):
            prefix = str(cls.model_config.get("env_prefix", "")).upper()
            raise ValueError(f"set both {prefix}{cert_field.upper()} and {prefix}{key_field.upper()}, or neither")
        return value

    @property
    def max_message_bytes(self) -> int:
        return self.max_message_mb * 1024 * 1024


def load_settings(cls: type[S], service: str) -> S:
    """Read settings or exit with a message naming every bad or missing variable."""
    try:
        return cls()
    except ValidationError as exc:
        prefix = str(cls.model_config.get("env_prefix", "")).upper()
        lines = []
        for err in exc.errors():
            field = ".".join(str(p) for p in err["loc"])
            # Model-level validators report no field: name the whole prefix instead of a truncated variable.
            var = f"{prefix}{field}".upper() if field else f"{prefix}*"
            if err["type"] == "missing":
                lines.append(f"  {var} is required but not set")
            else:
                lines.append(f"  {var}: {err['msg']} (got {err.get('input')!r})")
        sys.stderr.write(f"imgsearch-{service}: invalid configuration:\n" + "\n".join(lines) + "\n")
        raise SystemExit(2) from None
