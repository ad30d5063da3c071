"""Fixtures shared by the whole suite: real kv servers on ephemeral loopback ports.

`kv_server` runs `kv-server` as its own process over a SQLite file (so tests can restart or
kill -9 it); `grpc_server` runs the same server inside the test's event loop, over each store.
Every process started here is stopped here, by PID, in a `finally`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest

from kvserver.server import RunningServer, start
from kvtest import STORE_CONFIGS, ServerProcess, server_config


@pytest.fixture
def kv_server(tmp_path: Path) -> Iterator[ServerProcess]:
    server = ServerProcess(tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.kill()


@pytest.fixture
def server_process_factory(tmp_path: Path) -> Iterator[type[ServerProcess]]:
    """Start extra servers with `factory(directory, *args)`; all are killed at the end."""
    started: list[ServerProcess] = []

    class Tracked(ServerProcess):
        def __init__(self, directory: Path, *extra_args: str, store: str = "sqlite") -> None:
            super().__init__(directory, *extra_args, store=store)
            started.append(self)

    try:
        yield Tracked
    finally:
        for server in started:
            server.kill()


@pytest.fixture(params=list(STORE_CONFIGS))
async def grpc_server(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[RunningServer]:
    """An in-process server on an ephemeral port, once per store backend."""
    running = await start(server_config(tmp_path, request.param))
    try:
        yield running
    finally:
        await running.stop(grace_s=1.0)


@pytest.fixture
async def channel(grpc_server: RunningServer) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(grpc_server.address) as opened:
        yield opened
