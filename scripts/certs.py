"""Make a local certificate authority and the certificates kv needs for TLS and mutual TLS.

    python scripts/certs.py [--out build/certs] [--days 365] [--host NAME_OR_IP ...] [--force]

Writes into the directory (created if needed), with the openssl command-line tool:

    ca.pem, ca.key          the CA: give ca.pem to clients (--tls-client-ca for the server)
    server.pem, server.key  kv-server's certificate, for localhost, 127.0.0.1 and ::1 (and
                            every --host); --tls-cert and --tls-key
    client.pem, client.key  a client certificate (CN kv-client) for mutual TLS

Keys are EC P-256, readable by their owner only. An existing set is kept unless --force: a
running server keeps working. For local use and tests only: a real deployment gets its
certificates from its own CA.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DIR = ROOT / "build" / "certs"
DEFAULT_HOSTS = ("localhost", "127.0.0.1", "::1")
_KEY = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")


@dataclass(frozen=True)
class CertSet:
    directory: Path

    @property
    def ca(self) -> Path:
        return self.directory / "ca.pem"

    @property
    def ca_key(self) -> Path:
        return self.directory / "ca.key"

    @property
    def server_cert(self) -> Path:
        return self.directory / "server.pem"

    @property
    def server_key(self) -> Path:
        return self.directory / "server.key"

    @property
    def client_cert(self) -> Path:
        return self.directory / "client.pem"

    @property
    def client_key(self) -> Path:
        return self.directory / "client.key"

    def files(self) -> list[Path]:
        return [self.ca, self.ca_key, self.server_cert, self.server_key, self.client_cert, self.client_key]

    def complete(self) -> bool:
        return all(path.exists() for path in self.files())


def _openssl(*args: str) -> None:
    done = subprocess.run(["openssl", *args], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"openssl {' '.join(args[:2])} failed:\n{done.stderr}")


def _subject_alt_names(hosts: list[str]) -> str:
    names = []
    for host in hosts:
        try:
            names.append(f"IP:{ipaddress.ip_address(host)}")
        except ValueError:
            names.append(f"DNS:{host}")
    return ",".join(names)


def _issue(work: Path, ca: CertSet, name: str, subject: str, extensions: str, days: int) -> None:
    key, request, extfile = work / f"{name}.key", work / f"{name}.csr", work / f"{name}.ext"
    _openssl("req", "-new", *_KEY, "-keyout", str(key), "-out", str(request), "-subj", subject)
    extfile.write_text(f"[v3]\n{extensions}\n")
    _openssl(
        "x509",
        "-req",
        "-in",
        str(request),
        "-CA",
        str(ca.ca),
        "-CAkey",
        str(ca.ca_key),
        "-set_serial",
        "0x" + secrets.token_hex(16),
        "-days",
        str(days),
        "-sha256",
        "-extfile",
        str(extfile),
        "-extensions",
        "v3",
        "-out",
        str(work / f"{name}.pem"),
    )


def make_certs(
    directory: Path = DEFAULT_DIR,
    *,
    days: int = 365,
    hosts: list[str] | None = None,
    client_name: str = "kv-client",
    force: bool = False,
) -> CertSet:
    """Write a CA, a server certificate and a client certificate into `directory`."""
    if shutil.which("openssl") is None:
        raise RuntimeError("the openssl command is needed (Debian: apt-get install openssl)")
    target = CertSet(directory)
    if target.complete() and not force:
        return target
    directory.mkdir(parents=True, exist_ok=True)
    names = list(dict.fromkeys([*DEFAULT_HOSTS, *(hosts or [])]))
    # Everything is made in a temporary directory and moved in at the end: never half a set.
    with tempfile.TemporaryDirectory(dir=directory, prefix=".certs-") as temporary:
        work = Path(temporary)
        ca = CertSet(work)
        _openssl(
            "req",
            "-x509",
            "-new",
            *_KEY,
            "-keyout",
            str(ca.ca_key),
            "-out",
            str(ca.ca),
            "-days",
            str(days),
            "-sha256",
            "-subj",
            "/CN=kv local CA",
            "-addext",
            "basicConstraints=critical,CA:TRUE,pathlen:0",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        )
        _issue(
            work,
            ca,
            "server",
            "/CN=kv-server",
            "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n"
            f"extendedKeyUsage=serverAuth\nsubjectAltName={_subject_alt_names(names)}",
            days,
        )
        _issue(
            work,
            ca,
            "client",
            f"/CN={client_name}",
            "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\n"
            "extendedKeyUsage=clientAuth",
            days,
        )
        for path in ca.files():
            os.chmod(path, 0o600 if path.suffix == ".key" else 0o644)
            os.replace(path, directory / path.name)
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_DIR, help=f"directory (default {DEFAULT_DIR})")
    parser.add_argument("--days", type=int, default=365, help="validity in days (default 365)")
    parser.add_argument(
        "--host",
        action="append",
        default=[],
        help="another name or IP address for the server certificate (repeatable)",
    )
    parser.add_argument("--client-name", default="kv-client", help="common name of the client certificate")
    parser.add_argument("--force", action="store_true", help="replace an existing set")
    args = parser.parse_args(argv)
    existed = CertSet(args.out).complete()
    try:
        certs = make_certs(
            args.out, days=args.days, hosts=args.host, client_name=args.client_name, force=args.force
        )
    except RuntimeError as error:
        print(f"certs: {error}", file=sys.stderr)
        return 1
    verb = "kept the existing" if existed and not args.force else "wrote"
    print(f"certs: {verb} CA, server and client certificates in {certs.directory}", file=sys.stderr)
    print(
        f"  kv-server --tls-cert {certs.server_cert} --tls-key {certs.server_key}"
        f" [--tls-client-ca {certs.ca}]",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
