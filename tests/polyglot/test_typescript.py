"""The TypeScript client (clients/typescript) against a real kv-server: `npm test` compiles it with
tsc and runs `node --test`; the Node test file starts its own `kv-server` (the one of this venv)
and stops it by PID. See docs/any-language.md."""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path

import pytest

from kvtest import BIN

NODE_TEST_TIMEOUT_S = 100.0


@pytest.mark.timeout(NODE_TEST_TIMEOUT_S + 170)  # + npm ci if node_modules is missing
def test_typescript_client_suite(
    ts_package: Path, require_tool: Callable[[str, str], str], run_bounded: Callable[..., str]
) -> None:
    npm = require_tool("npm", "Node.js's package manager")
    env = {**os.environ, "KV_SERVER": str(BIN / "kv-server"), "npm_config_update_notifier": "false"}
    output = run_bounded([npm, "test"], cwd=ts_package, timeout_s=NODE_TEST_TIMEOUT_S, env=env)
    passed = re.search(r"^# pass (\d+)$", output, re.MULTILINE)
    failed = re.search(r"^# fail (\d+)$", output, re.MULTILINE)
    assert passed, f"no node --test summary in the output:\n{output}"
    assert failed, f"no node --test summary in the output:\n{output}"
    assert int(failed.group(1)) == 0, output
    # Every test of client.test.ts ran: an empty or filtered run must not pass quietly.
    assert int(passed.group(1)) >= 10, output
    assert "# skipped 0" in output, output
    assert "# todo 0" in output, output
