"""Connection settings shared by both clients: address checks, channel options, TLS and the bearer token."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

DEFAULT_ADDRESS = "127.0.0.1:50050"
DEFAULT_TIMEOUT = 30.0
# host:port, [v6]:port, or a gRPC target with an explicit scheme (dns:///, unix:, ...), which is passed through.
_HOST_PORT = re.compile(r"^(?P<host>\[[0-9A-Fa-f:.]+\]|[^\s:/\[\]]+):(?P<port>\d{1,5})$")
_SCHEME = re.compile(r"^(dns|unix|unix-abstract|ipv4|ipv6|vsock):")


class AddressError(ValueError):
    """The gateway address cannot be dialled as given."""


def default_address() -> str:
    return os.environ.get("IMGSEARCH_ADDRESS", DEFAULT_ADDRESS)


def check_address(address: str) -> str:
    """The address, stripped, if it names a port; gRPC would otherwise quietly dial port 443."""
    address = address.strip()
    if _SCHEME.match(address):
        return address
    m = _HOST_PORT.match(address)
    if m is None:
        if address and ":" not in address.strip("[]"):
            raise AddressError(f"{address!r} has no port: give host:port, e.g. {address}:50050")
        raise AddressError(f"{address!r} is not host:port (e.g. {DEFAULT_ADDRESS})")
    if not 0 < int(m["port"]) < 65536:
        raise AddressError(f"{address!r}: port {m['port']} is outside 1..65535")
    return address


@dataclass(frozen=True)
class Connection:
    """Where and how to reach the gateway; both clients build their channel from one of these."""

    address: str
    timeout: float = DEFAULT_TIMEOUT
    token: str | None = None
    ca_file: Path | None = None
    max_message_mb: int = 64

    @classmethod
    def make(
        cls,
        address: str | None,
        timeout: float,
        token: str | None,
        ca_file: str | os.PathLike[str] | None,
        max_message_mb: int,
    ) -> Connection:
        return cls(
            check_address(address or default_address()),
            timeout,
            token or None,
            Path(ca_file) if ca_file is not None else None,
            max_message_mb,
        )

    @property
    def options(self) -> list[tuple[str, Any]]:
        size = self.max_message_mb * 1024 * 1024
        return [("grpc.max_send_message_length", size), ("grpc.max_receive_message_length", size)]

    def credentials(self) -> grpc.ChannelCredentials | None:
        """TLS credentials when a CA file is set; None means plaintext."""
        if self.ca_file is None:
            return None
        return grpc.ssl_channel_credentials(root_certificates=self.ca_file.read_bytes())

    @property
    def metadata(self) -> list[tuple[str, str]]:
        return [("authorization", f"Bearer {self.token}")] if self.token else []
