"""TLS from settings: real handshakes against a real grpc.aio server on loopback, with a CA made here."""

from __future__ import annotations

import datetime
import ipaddress
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from pydantic import ValidationError

from imgsearch.kit import tls
from imgsearch.kit.peers import peer_channel
from imgsearch.kit.server import Runner, ServiceApp
from imgsearch.kit.settings import ServerSettings


@dataclass
class Pair:
    cert: Path
    key: Path


@dataclass
class PKI:
    """A CA, a server certificate for localhost/127.0.0.1 and a client certificate, as PEM files."""

    ca: Path
    server: Pair
    client: Pair
    ca_key: ec.EllipticCurvePrivateKey
    ca_cert: x509.Certificate


def _write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> None:
    path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def issue(
    pki_dir: Path,
    stem: str,
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    *,
    server: bool,
) -> Pair:
    """A leaf certificate signed by ca_key, valid for localhost and 127.0.0.1."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(f"imgsearch-test-{stem}"))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    pair = Pair(pki_dir / f"{stem}.crt", pki_dir / f"{stem}.key")
    pair.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _write_key(key, pair.key)
    return pair


def make_pki(pki_dir: Path, name: str = "ca") -> PKI:
    """A fresh self-signed CA with one server and one client certificate under pki_dir."""
    pki_dir.mkdir(parents=True, exist_ok=True)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(_name(f"imgsearch-test-{name}"))
        .issuer_name(_name(f"imgsearch-test-{name}"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )
    ca = pki_dir / f"{name}.crt"
    ca.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    return PKI(
        ca=ca,
        server=issue(pki_dir, f"{name}-server", ca_key, ca_cert, server=True),
        client=issue(pki_dir, f"{name}-client", ca_key, ca_cert, server=False),
        ca_key=ca_key,
        ca_cert=ca_cert,
    )


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def other_pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    return make_pki(tmp_path_factory.mktemp("other-pki"), "other")


async def start(settings: ServerSettings) -> Runner:
    """A server with only the kit's infrastructure (health, reflection, metrics), configured by settings."""
    runner = Runner(ServiceApp(name="tlstest", service_names=[], register=lambda _server: None), settings)
    await runner.start()
    await runner.load()
    return runner


async def health_over(channel: aio.Channel) -> int:
    resp = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=3)
    return int(resp.status)


def secure(port: int, creds: grpc.ChannelCredentials) -> aio.Channel:
    return aio.secure_channel(f"127.0.0.1:{port}", creds)


@pytest.fixture()
async def tls_server(pki: PKI) -> AsyncIterator[Runner]:
    runner = await start(
        ServerSettings(port=0, metrics_port=0, tls_cert_file=pki.server.cert, tls_key_file=pki.server.key)
    )
    yield runner
    await runner.drain()


async def test_handshake_with_the_test_ca(tls_server: Runner, pki: PKI) -> None:
    async with secure(tls_server.port, tls.channel_credentials(pki.ca)) as ch:
        assert await health_over(ch) == health_pb2.HealthCheckResponse.SERVING
    # The same server by DNS name: the certificate's SAN covers localhost too.
    async with aio.secure_channel(f"localhost:{tls_server.port}", tls.channel_credentials(pki.ca)) as ch:
        assert await health_over(ch) == health_pb2.HealthCheckResponse.SERVING


async def test_plaintext_and_untrusted_clients_fail(tls_server: Runner, other_pki: PKI) -> None:
    async with aio.insecure_channel(f"127.0.0.1:{tls_server.port}") as ch:
        with pytest.raises(aio.AioRpcError) as err:
            await health_over(ch)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    async with secure(tls_server.port, tls.channel_credentials(other_pki.ca)) as ch:
        with pytest.raises(aio.AioRpcError) as err:
            await health_over(ch)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_mutual_tls_requires_a_client_certificate_from_the_client_ca(
    pki: PKI, other_pki: PKI, tmp_path: Path
) -> None:
    runner = await start(
        ServerSettings(
            port=0,
            metrics_port=0,
            tls_cert_file=pki.server.cert,
            tls_key_file=pki.server.key,
            tls_client_ca_file=pki.ca,
        )
    )
    try:
        async with secure(runner.port, tls.channel_credentials(pki.ca)) as ch:
            with pytest.raises(aio.AioRpcError):
                await health_over(ch)
        wrong = tls.channel_credentials(pki.ca, other_pki.client.cert, other_pki.client.key)
        async with secure(runner.port, wrong) as ch:
            with pytest.raises(aio.AioRpcError):
                await health_over(ch)
        # A peer configured through its own settings: what services use for calls to each other.
        caller = ServerSettings(
            peer_tls_ca_file=pki.ca, peer_tls_cert_file=pki.client.cert, peer_tls_key_file=pki.client.key
        )
        async with peer_channel(f"127.0.0.1:{runner.port}", caller) as ch:
            assert await health_over(ch) == health_pb2.HealthCheckResponse.SERVING
    finally:
        await runner.drain()


async def test_plaintext_health_port_serves_only_health(pki: PKI) -> None:
    runner = await start(
        ServerSettings(
            port=0, metrics_port=0, health_port=0, tls_cert_file=pki.server.cert, tls_key_file=pki.server.key
        )
    )
    try:
        assert runner.health_port not in (0, runner.port)
        async with aio.insecure_channel(f"127.0.0.1:{runner.health_port}") as ch:
            assert await health_over(ch) == health_pb2.HealthCheckResponse.SERVING
            # Nothing but health listens in plaintext: reflection (and so every service) is absent there.
            with pytest.raises(aio.AioRpcError) as err:
                call: aio.UnaryUnaryMultiCallable[bytes, bytes] = ch.unary_unary(
                    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"
                )
                await call(b"", timeout=3)
            assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
    finally:
        await runner.drain()


async def test_rotated_certificate_is_served_to_new_connections(pki: PKI, other_pki: PKI, tmp_path: Path) -> None:
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    cert.write_bytes(pki.server.cert.read_bytes())
    key.write_bytes(pki.server.key.read_bytes())
    runner = await start(ServerSettings(port=0, metrics_port=0, tls_cert_file=cert, tls_key_file=key))
    try:
        async with secure(runner.port, tls.channel_credentials(other_pki.ca)) as ch:
            with pytest.raises(aio.AioRpcError):
                await health_over(ch)
        # cert-manager renews into the same Secret: the files change under the running server.
        cert.write_bytes(other_pki.server.cert.read_bytes())
        key.write_bytes(other_pki.server.key.read_bytes())
        async with secure(runner.port, tls.channel_credentials(other_pki.ca)) as ch:
            assert await health_over(ch) == health_pb2.HealthCheckResponse.SERVING
        async with secure(runner.port, tls.channel_credentials(pki.ca)) as ch:
            with pytest.raises(aio.AioRpcError):
                await health_over(ch)
    finally:
        await runner.drain()


def test_half_written_rotation_keeps_the_last_good_certificate(pki: PKI, tmp_path: Path) -> None:
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    cert.write_bytes(pki.server.cert.read_bytes())
    key.write_bytes(pki.server.key.read_bytes())
    certs = tls.ReloadingServerCertificates(cert, key, None)
    assert certs.fetch() is None  # unchanged files: gRPC keeps what it has
    key.write_bytes(b"")
    assert certs.fetch() is None
    assert certs.reloads == 0
    key.write_bytes(pki.server.key.read_bytes() + b"\n")
    assert certs.fetch() is not None
    assert certs.reloads == 1


def test_plaintext_unless_configured(pki: PKI) -> None:
    assert tls.server_credentials(ServerSettings()) is None
    assert tls.peer_credentials(ServerSettings()) is None
    assert tls.peer_credentials(ServerSettings(peer_tls_ca_file=pki.ca)) is not None


def test_settings_reject_half_configured_tls(pki: PKI, tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="set both IMGSEARCH_TLS_CERT_FILE and IMGSEARCH_TLS_KEY_FILE"):
        ServerSettings(tls_cert_file=pki.server.cert)
    with pytest.raises(ValidationError, match="set both IMGSEARCH_TLS_CERT_FILE and IMGSEARCH_TLS_KEY_FILE"):
        ServerSettings(tls_key_file=pki.server.key)
    with pytest.raises(ValidationError, match="PEER_TLS_CERT_FILE"):
        ServerSettings(peer_tls_ca_file=pki.ca, peer_tls_cert_file=pki.client.cert)
    with pytest.raises(ValidationError, match="does not point to a file"):
        ServerSettings(tls_cert_file=tmp_path / "absent.crt", tls_key_file=pki.server.key)
    empty = tmp_path / "empty.pem"
    empty.write_bytes(b"")
    with pytest.raises(tls.TLSConfigError, match="is empty"):
        tls.channel_credentials(empty)


async def test_unreadable_certificate_stops_the_server_with_a_message(pki: PKI, tmp_path: Path) -> None:
    empty = tmp_path / "empty.crt"
    empty.write_bytes(b"")
    runner = Runner(
        ServiceApp(name="tlstest", service_names=[], register=lambda _server: None),
        ServerSettings(port=0, metrics_port=0, tls_cert_file=empty, tls_key_file=pki.server.key),
    )
    with pytest.raises(SystemExit, match=r"imgsearch-tlstest: TLS certificate .*empty\.crt is empty"):
        await runner.start()
