"""TLS credentials from settings: server certificates reloaded on rotation, and peer channel credentials."""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import grpc

from imgsearch.kit.settings import ServerSettings

log = logging.getLogger(__name__)


class TLSConfigError(Exception):
    """A certificate, key or CA file is missing, empty or unreadable."""


def _read(path: Path, what: str) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise TLSConfigError(f"cannot read {what} {path}: {exc.strerror or exc}") from exc
    if not data.strip():
        raise TLSConfigError(f"{what} {path} is empty")
    return data


@dataclass(frozen=True)
class _Stamp:
    """What identifies one version of the files: cert-manager and kubelet swap them atomically."""

    parts: tuple[tuple[int, int, int], ...]

    @classmethod
    def of(cls, paths: list[Path]) -> _Stamp:
        out = []
        for p in paths:
            st = os.stat(p)  # follows the ..data symlink Kubernetes swaps on Secret updates
            out.append((st.st_ino, st.st_mtime_ns, st.st_size))
        return cls(tuple(out))


class ReloadingServerCertificates:
    """Serves the current certificate files; new handshakes see a rotated certificate without a restart.

    gRPC calls `fetch` before each handshake; it re-reads the files only when their inode, mtime or size
    changed, and keeps the last good pair when a rotation is caught half-written.
    """

    def __init__(self, cert_file: Path, key_file: Path, client_ca_file: Path | None) -> None:
        self.cert_file = cert_file
        self.key_file = key_file
        self.client_ca_file = client_ca_file
        self._lock = threading.Lock()
        self._stamp = self._current_stamp()
        self.config = self._load()
        self.reloads = 0

    def _paths(self) -> list[Path]:
        return [self.cert_file, self.key_file, *([self.client_ca_file] if self.client_ca_file else [])]

    def _current_stamp(self) -> _Stamp:
        return _Stamp.of(self._paths())

    def _load(self) -> grpc.ServerCertificateConfiguration:
        cert = _read(self.cert_file, "TLS certificate")
        key = _read(self.key_file, "TLS private key")
        ca = _read(self.client_ca_file, "client CA bundle") if self.client_ca_file else None
        return grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=ca)

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """Return a new configuration when the files changed, else None (gRPC keeps the current one)."""
        with self._lock:
            try:
                stamp = self._current_stamp()
                if stamp == self._stamp:
                    return None
                config = self._load()
            except (OSError, TLSConfigError) as exc:
                log.error("TLS certificate reload failed; keeping the current one", extra={"error": str(exc)})
                return None
            self._stamp = stamp
            self.config = config
            self.reloads += 1
            log.info("TLS certificate reloaded", extra={"cert_file": str(self.cert_file)})
            return config


def server_credentials(settings: ServerSettings) -> grpc.ServerCredentials | None:
    """TLS server credentials when TLS_CERT_FILE/TLS_KEY_FILE are set, else None (plaintext)."""
    if settings.tls_cert_file is None or settings.tls_key_file is None:
        return None
    certs = ReloadingServerCertificates(settings.tls_cert_file, settings.tls_key_file, settings.tls_client_ca_file)
    return grpc.dynamic_ssl_server_credentials(
        certs.config,
        # gRPC documents None as "no change"; the type stubs only allow a configuration.
        cast("Callable[[], grpc.ServerCertificateConfiguration]", certs.fetch),
        require_client_authentication=settings.tls_client_ca_file is not None,
    )


def channel_credentials(
    ca_file: Path | None, cert_file: Path | None = None, key_file: Path | None = None
) -> grpc.ChannelCredentials:
    """TLS channel credentials: verify the server with ca_file (system roots when None), present a client cert."""
    ca = _read(ca_file, "CA bundle") if ca_file else None
    if (cert_file is None) != (key_file is None):
        raise TLSConfigError("a client certificate needs both its certificate and its key file")
    cert = _read(cert_file, "client certificate") if cert_file else None
    key = _read(key_file, "client private key") if key_file else None
    return grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)


def peer_credentials(settings: ServerSettings) -> grpc.ChannelCredentials | None:
    """Credentials for calls to peers: TLS when PEER_TLS_CA_FILE is set, else None (plaintext)."""
    if settings.peer_tls_ca_file is None:
        return None
    return channel_credentials(settings.peer_tls_ca_file, settings.peer_tls_cert_file, settings.peer_tls_key_file)
