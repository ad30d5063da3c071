"""The generated Go stubs (clients/go) against a real kv-server: clients/go/build.sh builds
cmd/kv-smoke offline against Debian's Go packages, and the program runs Status, Put, Get, List,
Watch (live and resumed) and Delete, exiting non-zero at the first failed check."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest

from kv.v1 import kv_pb2, kv_pb2_grpc
from kvtest import ServerProcess

ROOT = Path(__file__).resolve().parents[2]
BUILD_TIMEOUT_S = 150.0  # a cold build cache compiles grpc-go and protobuf-go: ~40 s here
RUN_TIMEOUT_S = 30.0


@pytest.fixture(scope="module")
def kv_smoke(
    tmp_path_factory: pytest.TempPathFactory,
    require_tool: Callable[[str, str], str],
    run_bounded: Callable[..., str],
) -> Path:
    require_tool("go", "Debian package golang-go")
    out = tmp_path_factory.mktemp("go-bin")
    run_bounded([str(ROOT / "clients" / "go" / "build.sh"), str(out)], cwd=ROOT, timeout_s=BUILD_TIMEOUT_S)
    return out / "kv-smoke"


def run_smoke(program: Path, server: ServerProcess, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(  # noqa: S603
        [str(program), "-addr", server.address, "-timeout", "20s", *args],
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
        check=False,
        stdin=subprocess.DEVNULL,
    )


@pytest.mark.timeout(BUILD_TIMEOUT_S + RUN_TIMEOUT_S + 20)
def test_go_program_against_the_server(kv_smoke: Path, memory_server: ServerProcess) -> None:
    result = run_smoke(kv_smoke, memory_server)
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}"
    lines = result.stdout.splitlines()
    assert lines[-1] == "10 passed, 0 failed", result.stdout
    for check in ("Put ", "Get:", "List:", "Watch:", "Watch resumed", "Delete:"):
        assert any(line.startswith(f"ok   {check}") for line in lines), (check, result.stdout)


@pytest.mark.timeout(BUILD_TIMEOUT_S + RUN_TIMEOUT_S + 20)
def test_go_program_exits_non_zero_when_a_check_fails(kv_smoke: Path, memory_server: ServerProcess) -> None:
    # The key the program creates already exists, so its first Put reports created = false.
    with grpc.insecure_channel(memory_server.address) as channel:
        kv_pb2_grpc.KeyValueStub(channel).Put(kv_pb2.PutRequest(key="taken/a", value="x"), timeout=10)
    result = run_smoke(kv_smoke, memory_server, "-prefix", "taken/")
    assert result.returncode == 1, f"{result.stdout}\n{result.stderr}"
    assert "FAIL Put a: created = false" in result.stdout, result.stdout
    assert result.stdout.splitlines()[-1].endswith("passed, 1 failed"), result.stdout
