"""Fixtures of the polyglot tests: the contract used from TypeScript, Go and grpcurl against a real
`kv-server` process. The toolchains come from scripts/install-polyglot-deps.sh (`make
polyglot-deps`, which `make test` runs first); a missing one fails the test with that hint, it is
never skipped."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from kvtest import ServerProcess

ROOT = Path(__file__).resolve().parents[2]
TS_ROOT = ROOT / "clients" / "typescript"
INSTALL_HINT = "run `make polyglot-deps` (scripts/install-polyglot-deps.sh)"
NPM_CI_TIMEOUT_S = 150.0

RequireTool = Callable[[str, str], str]
RunBounded = Callable[..., str]


def _require_tool(name: str, what: str) -> str:
    """The tool's path, or a test failure that says how to install it."""
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} ({what}) is not installed: {INSTALL_HINT}", pytrace=False)
    return path


def _run_bounded(
    command: list[str], *, cwd: Path, timeout_s: float, env: dict[str, str] | None = None
) -> str:
    """Run a command with a deadline; fail the test with its output if it fails or times out."""
    try:
        result = subprocess.run(  # noqa: S603
            command,
            cwd=cwd,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
            stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired as timeout:
        partial = timeout.stdout or ""
        output = partial.decode(errors="replace") if isinstance(partial, bytes) else partial
        pytest.fail(f"{' '.join(command)} timed out after {timeout_s:.0f} s\n{output}", pytrace=False)
    output = result.stdout + result.stderr
    if result.returncode != 0:
        pytest.fail(f"{' '.join(command)} exited {result.returncode} in {cwd}:\n{output}", pytrace=False)
    return output


@pytest.fixture(scope="session")
def require_tool() -> RequireTool:
    """`require_tool(name, what)`: the tool's path, or a failure that says how to install it."""
    return _require_tool


@pytest.fixture(scope="session")
def run_bounded() -> RunBounded:
    """`run_bounded(command, cwd=, timeout_s=, env=None)`: its output; a failure if it fails."""
    return _run_bounded


@pytest.fixture(scope="session")
def ts_package() -> Path:
    """clients/typescript with its node_modules installed (`npm ci` if missing or stale)."""
    _require_tool("node", "Node.js >= 20")
    npm = _require_tool("npm", "Node.js's package manager")
    installed = TS_ROOT / "node_modules" / ".package-lock.json"
    lock = TS_ROOT / "package-lock.json"
    if not installed.exists() or installed.stat().st_mtime < lock.stat().st_mtime:
        _run_bounded(
            [npm, "ci", "--no-audit", "--no-fund", "--loglevel=error"],
            cwd=TS_ROOT,
            timeout_s=NPM_CI_TIMEOUT_S,
            env={**os.environ, "npm_config_update_notifier": "false"},
        )
    return TS_ROOT


@pytest.fixture
def memory_server(tmp_path: Path) -> Iterator[ServerProcess]:
    """A `kv-server --store memory` process on an ephemeral loopback port, killed by PID."""
    server = ServerProcess(tmp_path, store="memory")
    server.start()
    try:
        yield server
    finally:
        server.kill()
