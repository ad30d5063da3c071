"""Fixtures of the integration tests: in-process servers with a configuration of the test's own."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from kvserver.server import RunningServer, start
from kvtest import STORE_CONFIGS, server_config

StartServer = Callable[..., Awaitable[RunningServer]]


@pytest.fixture(params=list(STORE_CONFIGS))
async def start_server(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[StartServer]:
    """`await start_server(**config_overrides)`: one in-process server on an ephemeral port, over
    each store backend in turn. Stopped at the end of the test (again, if the test stopped it)."""
    started: list[RunningServer] = []

    async def start_with(**overrides: object) -> RunningServer:
        assert not started, "one server per test: they would share the database file"
        running = await start(server_config(tmp_path, request.param, **overrides))
        started.append(running)
        return running

    try:
        yield start_with
    finally:
        for running in started:
            await running.stop(grace_s=1.0)
