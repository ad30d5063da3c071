"""The `kv` command beyond the shared scenarios: help, exit statuses, binary safety, output."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from kvclient.cli import build_parser
from kvclient.cli._output import duration, show_value
from kvtest import ServerProcess

KV = Path(sys.executable).parent / "kv"
COMMANDS = ["put", "get", "delete", "list", "watch", "status"]


def kv(
    *args: str, address: str | None = None, stdin: bytes | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[bytes]:
    environment = {**os.environ, **(env or {})}
    environment.pop("KV_TOKEN", None)
    if address is not None:
        environment["KV_ADDRESS"] = address
    return subprocess.run(  # noqa: S603
        [str(KV), *args], input=stdin, capture_output=True, env=environment, timeout=60, check=False
    )


@pytest.fixture
def address(kv_server: ServerProcess) -> str:
    return kv_server.address


@pytest.fixture
def key() -> str:
    return f"cli-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def dead_address() -> Iterator[str]:
    """A loopback port nothing listens on."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield f"127.0.0.1:{sock.getsockname()[1]}"


# --------------------------------------------------------------------------- help and usage


@pytest.mark.parametrize("command", [None, *COMMANDS])
def test_every_command_has_help_with_an_example(command: str | None) -> None:
    done = kv(*([command] if command else []), "--help")
    assert done.returncode == 0
    text = done.stdout.decode()
    assert "examples:" in text
    assert "  kv " in text.split("examples:")[1]
    assert "-o {text,json}" in text


def test_the_parser_knows_every_command() -> None:
    parser = build_parser()
    for command in COMMANDS:
        assert parser.parse_args(
            [command, "k", "v"] if command == "put" else [command, *(["k"] * (command in ("get", "delete")))]
        )


@pytest.mark.parametrize(
    "args",
    [
        [],
        ["frobnicate"],
        ["put", "k"],
        ["put", "k", "v", "--ttl", "-1"],
        ["put", "k", "v", "--ttl", "soon"],
        ["put", "k", "v", "--if-absent", "--if-present"],
        ["put", "k", "v", "--if-version", "0"],
        ["get"],
        ["list", "--limit", "0"],
        ["watch", "k", "--prefix", "p"],
        ["get", "k", "-o", "yaml"],
    ],
)
def test_usage_errors_exit_2(args: list[str], dead_address: str) -> None:
    done = kv(*args, address=dead_address)
    assert done.returncode == 2
    assert b"usage:" in done.stderr
    assert b"Traceback" not in done.stderr


def test_an_invalid_request_rejected_by_the_server_exits_2(address: str, key: str) -> None:
    done = kv("put", key, "v", "--if-absent", "--if-version", "3", address=address)
    assert done.returncode == 2
    assert done.stderr.startswith(b"kv: ")
    assert done.stderr.count(b"\n") == 1


# --------------------------------------------------------------------------- exit statuses


def test_key_not_found_exits_1_with_a_message(address: str, key: str) -> None:
    done = kv("get", key, address=address)
    assert done.returncode == 1
    assert done.stdout == b""
    assert done.stderr.startswith(b"kv: ")
    assert key.encode() in done.stderr
    assert kv("delete", key, address=address).returncode == 1
    assert kv("delete", key, "--allow-missing", address=address).returncode == 0


def test_a_failed_condition_exits_3(address: str, key: str) -> None:
    assert kv("put", key, "1", "--if-absent", address=address).returncode == 0
    done = kv("put", key, "2", "--if-absent", address=address)
    assert done.returncode == 3
    assert done.stderr.startswith(b"kv: ")
    assert kv("put", key, "2", "--if-version", "9", address=address).returncode == 3
    assert kv("get", key, address=address).stdout == b"1"


@pytest.mark.parametrize("command", [["get", "k"], ["put", "k", "v"], ["list"], ["status"], ["watch", "k"]])
def test_connection_errors_exit_4_with_one_line(command: list[str], dead_address: str) -> None:
    started = time.monotonic()
    done = kv(*command, "--timeout", "3", address=dead_address)
    assert done.returncode == 4
    lines = done.stderr.decode().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith(f"kv: cannot reach the server at {dead_address}")
    assert time.monotonic() - started < 10


def test_kv_address_and_address_flag(address: str, key: str, dead_address: str) -> None:
    assert kv("put", key, "v", address=address).returncode == 0
    # --address wins over $KV_ADDRESS, before or after the command.
    assert kv("--address", address, "get", key, address=dead_address).stdout == b"v"
    assert kv("get", key, "-a", address, address=dead_address).stdout == b"v"


# --------------------------------------------------------------------------- values


def test_binary_values_through_stdin_and_stdout(address: str, key: str) -> None:
    blob = bytes(range(256)) * 4 + b"\r\n\x00"
    assert kv("put", key, "-", address=address, stdin=blob).returncode == 0
    done = kv("get", key, address=address)
    assert done.returncode == 0
    assert done.stdout == blob  # exact bytes: nothing added, nothing decoded
    shown = json.loads(kv("get", key, "-o", "json", address=address).stdout)
    assert "value" not in shown
    assert "value_bytes" in shown


def test_non_utf8_argument_bytes_are_kept(address: str, key: str) -> None:
    raw = b"caf\xe9"  # latin-1, not UTF-8
    done = subprocess.run(  # noqa: S603
        [os.fsencode(KV), b"put", key.encode(), raw],
        env={**os.environ, "KV_ADDRESS": address},
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert kv("get", key, address=address).stdout == raw


def test_ttl_with_millisecond_precision(address: str, key: str) -> None:
    before = time.time()
    done = kv("put", key, "v", "--ttl", "1.5", "-o", "json", address=address)
    assert done.returncode == 0
    expires = json.loads(done.stdout)["expires_at"]
    from datetime import datetime

    at = datetime.fromisoformat(expires).timestamp()
    assert before + 1.3 < at < time.time() + 1.6
    assert b"expires in" in kv("put", key, "v", "--ttl", "90", address=address).stdout


# --------------------------------------------------------------------------- output


def test_json_output_for_every_command(address: str, key: str) -> None:
    put = json.loads(kv("put", key, "v", "-o", "json", address=address).stdout)
    assert (put["key"], put["created"], put["version"]) == (key, True, 1)
    got = json.loads(kv("get", key, "-o", "json", address=address).stdout)
    assert (got["value"], got["mod_revision"]) == ("v", put["revision"])
    listing = json.loads(kv("list", "--prefix", key, "-o", "json", address=address).stdout)
    assert [e["key"] for e in listing["entries"]] == [key]
    assert listing["revision"] >= put["revision"]
    status = json.loads(kv("status", "-o", "json", address=address).stdout)
    assert status["store"] == "sqlite"
    deleted = json.loads(kv("delete", key, "-o", "json", address=address).stdout)
    assert deleted["deleted"] == 1


def test_list_prints_an_aligned_table(address: str, key: str) -> None:
    kv("put", f"{key}/a", "short", address=address)
    kv("put", f"{key}/bbbbbbbb", "x" * 100, "--ttl", "3600", address=address)
    kv("put", f"{key}/c", "-", address=address, stdin=b"\xff\x00")
    lines = kv("list", "--prefix", key + "/", address=address).stdout.decode().splitlines()
    assert lines[0].split() == ["KEY", "VERSION", "MOD_REV", "TTL", "VALUE"]
    value_column = lines[0].index("VALUE")
    assert all(len(line) > value_column for line in lines[1:4])
    assert lines[1].startswith(f"{key}/a ")
    assert lines[2][value_column:].startswith("xxx")
    assert lines[2][value_column:].endswith("…")
    assert "59m" in lines[2] or "1h00m" in lines[2]
    assert lines[3][value_column:] == "<2 bytes>"
    assert lines[4].startswith("(3 keys, revision ")
    keys_only = kv("list", "--prefix", key + "/", "--keys-only", address=address).stdout.decode()
    assert keys_only.splitlines() == [f"{key}/a", f"{key}/bbbbbbbb", f"{key}/c"]  # piped: one per line
    limited = kv("list", "--prefix", key + "/", "--limit", "1", address=address).stdout.decode()
    assert "(1 key of 3, revision" in limited


def test_watch_prints_lines_and_ctrl_c_exits_0_quietly(address: str, key: str) -> None:
    process = subprocess.Popen(  # noqa: S603
        [str(KV), "watch", "--prefix", key + "/"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "KV_ADDRESS": address},
    )
    try:
        assert process.stdout is not None
        time.sleep(1.0)  # let it subscribe (a watch "from now")
        kv("put", f"{key}/x", "hello", address=address)
        kv("delete", f"{key}/x", address=address)
        first = process.stdout.readline().decode()
        second = process.stdout.readline().decode()
        assert first.split()[1:] == ["PUT", f"{key}/x", "=", "hello"]
        assert second.split()[1:] == ["DELETE", f"{key}/x"]
        assert int(first.split()[0]) + 1 == int(second.split()[0])
        process.send_signal(signal.SIGINT)
        assert process.wait(15) == 0
        assert process.stderr is not None
        assert process.stderr.read() == b""
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(5)
        for stream in (process.stdout, process.stderr):
            if stream is not None:
                stream.close()


def test_status_reads_well(address: str) -> None:
    lines = kv("status", address=address).stdout.decode().splitlines()
    names = [line.split()[0] for line in lines]
    assert names[:5] == ["server", "store", "revision", "keys", "started"]
    assert "UTC (up " in lines[4]


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0.25, "250ms"), (1.5, "1.5s"), (3.0, "3s"), (65, "1m05s"), (3700, "1h01m"), (90000, "1d01h")],
)
def test_durations_read_well(seconds: float, text: str) -> None:
    assert duration(seconds) == text


def test_values_show_on_one_line() -> None:
    assert show_value(b"hello") == "hello"
    assert show_value(b"two\nlines") == '"two\\nlines"'
    assert show_value(b"\xff\xfe") == "<2 bytes>"
    assert show_value(b"x" * 100, 10) == "x" * 9 + "…"
