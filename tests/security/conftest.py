"""Fixtures of the security tests: a token file, certificates (scripts/certs.py) and servers
that use them. Every process started here is stopped here, by PID, in a `finally`."""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from kvserver.server import RunningServer, start
from kvtest import server_config

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # for scripts.certs, scripts.serve and tests.security.kit

from scripts.certs import CertSet, make_certs  # noqa: E402
from tests.security.kit import StartServer, write_tokens_file  # noqa: E402


@pytest.fixture(scope="session")
def certs(tmp_path_factory: pytest.TempPathFactory) -> CertSet:
    """A CA with a server certificate (localhost, 127.0.0.1, ::1) and a client certificate."""
    return make_certs(tmp_path_factory.mktemp("certs"), days=2)


@pytest.fixture(scope="session")
def other_certs(tmp_path_factory: pytest.TempPathFactory) -> CertSet:
    """A second, unrelated CA and its certificates: trusted by nobody."""
    return make_certs(tmp_path_factory.mktemp("other-certs"), days=2)


@pytest.fixture(scope="session")
def tokens_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tokens_file(tmp_path_factory.mktemp("auth") / "tokens.toml")


@pytest.fixture
async def start_server(tmp_path: Path) -> AsyncIterator[StartServer]:
    """`await start_server(store="memory", **config_overrides)`: an in-process server on an
    ephemeral port, stopped at the end of the test."""
    started: list[RunningServer] = []

    async def start_with(store: str = "memory", **overrides: object) -> RunningServer:
        running = await start(server_config(tmp_path / f"server{len(started)}", store, **overrides))
        started.append(running)
        return running

    try:
        yield start_with
    finally:
        for running in started:
            await running.stop(grace_s=0.5)


@pytest.fixture
def processes() -> Iterator[list[object]]:
    """Processes (kvtest.ServerProcess, kit.Envoy) ended at the end of the test, last first:
    by `kill()` where there is one, else `stop()`."""
    started: list[object] = []
    try:
        yield started
    finally:
        for process in reversed(started):
            end = getattr(process, "kill", None) or process.stop  # type: ignore[attr-defined]
            end()
