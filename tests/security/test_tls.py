"""TLS and mutual TLS on the gRPC port of a real kv-server process (certificates from
scripts/certs.py), and the warnings of a server that listens beyond this machine."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from scripts.certs import CertSet
from tests.security.kit import TOKENS

import kvclient
from kv.v1 import kv_pb2, kv_pb2_grpc
from kvserver.api.tls import exposure_warnings, is_loopback
from kvserver.config import Config
from kvtest import BIN, ServerProcess

ADMIN = TOKENS["admin"]


def _status(channel: grpc.Channel, metadata: tuple[tuple[str, str], ...] = ()) -> int:
    stub = kv_pb2_grpc.KeyValueStub(channel)
    return stub.Status(kv_pb2.StatusRequest(), timeout=5, metadata=metadata).header.revision


def _credentials(ca: Path, cert: Path | None = None, key: Path | None = None) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(
        root_certificates=ca.read_bytes(),
        private_key=key.read_bytes() if key else None,
        certificate_chain=cert.read_bytes() if cert else None,
    )


def _refused(channel: grpc.Channel) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as failure:
        _status(channel)
    code: grpc.StatusCode = failure.value.code()
    return code


@pytest.fixture
def tls_server(tmp_path: Path, certs: CertSet) -> Iterator[ServerProcess]:
    server = ServerProcess(tmp_path, "--tls-cert", str(certs.server_cert), "--tls-key", str(certs.server_key))
    server.start()
    try:
        yield server
    finally:
        server.kill()


@pytest.fixture
def mtls_server(tmp_path: Path, certs: CertSet, tokens_file: Path) -> Iterator[ServerProcess]:
    server = ServerProcess(
        tmp_path,
        "--tls-cert",
        str(certs.server_cert),
        "--tls-key",
        str(certs.server_key),
        "--tls-client-ca",
        str(certs.ca),
        "--auth-tokens",
        str(tokens_file),
    )
    server.start()
    try:
        yield server
    finally:
        server.kill()


def test_a_tls_client_is_served(tls_server: ServerProcess, certs: CertSet) -> None:
    with grpc.secure_channel(tls_server.address, _credentials(certs.ca)) as channel:
        assert _status(channel) == 0
    # By name too: the certificate names localhost.
    with grpc.secure_channel(f"localhost:{tls_server.port}", _credentials(certs.ca)) as channel:
        assert _status(channel) == 0
    assert "with TLS" in tls_server.log()
    assert "WITHOUT TLS" not in tls_server.log()


def test_a_plaintext_client_of_a_tls_port_fails_cleanly(tls_server: ServerProcess) -> None:
    with grpc.insecure_channel(tls_server.address) as channel:
        assert _refused(channel) == grpc.StatusCode.UNAVAILABLE
    assert tls_server.process is not None
    assert tls_server.process.poll() is None  # still serving


def test_a_client_that_does_not_trust_the_server_ca_fails(
    tls_server: ServerProcess, other_certs: CertSet
) -> None:
    with grpc.secure_channel(tls_server.address, _credentials(other_certs.ca)) as channel:
        assert _refused(channel) == grpc.StatusCode.UNAVAILABLE


def test_mutual_tls_serves_a_client_with_a_certificate(mtls_server: ServerProcess, certs: CertSet) -> None:
    credentials = _credentials(certs.ca, certs.client_cert, certs.client_key)
    with grpc.secure_channel(mtls_server.address, credentials) as channel:
        assert _status(channel, ADMIN.metadata) == 0
        # TLS authenticates the connection; the token still decides what it may do.
        with pytest.raises(grpc.RpcError) as refused:
            _status(channel)
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "with mutual TLS" in mtls_server.log()


def test_mutual_tls_refuses_a_client_without_a_certificate(
    mtls_server: ServerProcess, certs: CertSet
) -> None:
    with grpc.secure_channel(mtls_server.address, _credentials(certs.ca)) as channel:
        assert _refused(channel) == grpc.StatusCode.UNAVAILABLE


def test_mutual_tls_refuses_a_certificate_of_another_ca(
    mtls_server: ServerProcess, certs: CertSet, other_certs: CertSet
) -> None:
    credentials = _credentials(certs.ca, other_certs.client_cert, other_certs.client_key)
    with grpc.secure_channel(mtls_server.address, credentials) as channel:
        assert _refused(channel) == grpc.StatusCode.UNAVAILABLE


def test_kvclient_over_mutual_tls_with_a_token(mtls_server: ServerProcess, certs: CertSet) -> None:
    tls = kvclient.Tls.from_files(certs.ca, certs.client_cert, certs.client_key)
    with kvclient.Client(mtls_server.address, tls=tls, token=ADMIN.secret) as client:
        client.put("greeting", b"hello")
        assert client.get("greeting").value == b"hello"


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--tls-cert", "{cert}"], "TLS needs both --tls-cert and --tls-key"),
        (["--tls-client-ca", "{ca}"], "TLS needs both --tls-cert and --tls-key"),
        (["--tls-cert", "{key}", "--tls-key", "{key}"], "not a PEM file with a CERTIFICATE"),
        (["--tls-cert", "{cert}", "--tls-key", "{missing}"], "No such file"),
    ],
)
def test_a_wrong_tls_setting_stops_the_server_at_start(
    tmp_path: Path, certs: CertSet, flags: list[str], message: str
) -> None:
    paths = {"cert": certs.server_cert, "key": certs.server_key, "ca": certs.ca, "missing": tmp_path / "nope"}
    command = [str(BIN / "kv-server"), "--port", "0", "--store", "memory"]
    command += [flag.format(**paths) for flag in flags]
    done = subprocess.run(command, capture_output=True, text=True, timeout=30, check=False)  # noqa: S603
    assert done.returncode == 1
    assert "cannot start" in done.stderr
    assert message in done.stderr


def test_exposure_warnings_name_what_a_reachable_server_lacks() -> None:
    for host in ("127.0.0.1", "localhost", "::1", "[::1]", "127.0.0.2"):
        assert is_loopback(host)
        assert exposure_warnings(Config(host=host)) == []
    for host in ("0.0.0.0", "::", "10.1.2.3", "kv.example.com"):  # noqa: S104
        assert not is_loopback(host)
    plain = exposure_warnings(Config(host="0.0.0.0"))  # noqa: S104
    assert len(plain) == 2
    assert "WITHOUT TLS" in plain[0]
    assert "WITHOUT AUTHENTICATION" in plain[1]
    secured = Config(host="0.0.0.0", tls_cert="c", tls_key="k", auth_tokens="t")  # noqa: S104
    assert exposure_warnings(secured) == []
