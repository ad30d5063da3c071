"""TLS on the gRPC port, and the warnings of a server that listens beyond this machine."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import grpc

from kvserver.config import Config


class TlsConfigError(RuntimeError):
    """The TLS settings cannot be used (kv-server reports it and does not start)."""


def server_credentials(config: Config) -> grpc.ServerCredentials | None:
    """The credentials of the gRPC port: None for plaintext (no certificate configured); with
    a client CA, clients must present a certificate it signed (mutual TLS)."""
    if not (config.tls_cert or config.tls_key or config.tls_client_ca):
        return None
    if not config.tls_cert or not config.tls_key:
        raise TlsConfigError("TLS needs both --tls-cert and --tls-key")
    chain = _read_pem(config.tls_cert, "--tls-cert", "CERTIFICATE")
    key = _read_pem(config.tls_key, "--tls-key", "PRIVATE KEY")
    client_ca = (
        _read_pem(config.tls_client_ca, "--tls-client-ca", "CERTIFICATE") if config.tls_client_ca else None
    )
    return grpc.ssl_server_credentials(
        [(key, chain)], root_certificates=client_ca, require_client_auth=client_ca is not None
    )


def _read_pem(path: str, flag: str, kind: str) -> bytes:
    data = Path(path).read_bytes()
    if b"-----BEGIN " not in data or kind.encode() not in data:
        raise TlsConfigError(f"{flag} {path}: not a PEM file with a {kind}")
    return data


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def exposure_warnings(config: Config) -> list[str]:
    """What a server reachable from other machines lacks, one sentence each (logged as WARNING)."""
    if is_loopback(config.host):
        return []
    warnings = []
    if not config.tls_cert:
        warnings.append(
            f"SECURITY: listening on {config.host} WITHOUT TLS: keys, values and bearer tokens cross "
            "the network in clear text, readable and changeable by anyone on the path. Set --tls-cert "
            "and --tls-key (see the README, Security), or listen on 127.0.0.1."
        )
    if not config.auth_tokens:
        warnings.append(
            f"SECURITY: listening on {config.host} WITHOUT AUTHENTICATION: anyone who can reach this "
            "port can read, write and delete every key. Set --auth-tokens (see the README, Security)."
        )
    return warnings
