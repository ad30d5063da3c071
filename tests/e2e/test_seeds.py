"""The REST APIs of the five seed projects, served by kv through Envoy.

Every curl example of every seed README runs here as written, through bash, with only its host
and port changed; its documented status and JSON fields must come back (extra fields are fine,
documented ones must match exactly, a JSON number staying a number). The seeds that document
routes without curl examples (001: /keys with 201/200/404, 004: /put, /get, /delete) are driven
by their documented rules. `test_every_seed_curl_example_is_here` re-reads the seed READMEs,
when they are at hand, so none can be missed.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from tests.e2e.conftest import Gateway

pytestmark = pytest.mark.gateway

# The seed READMEs live in shared/, beside the repository's checkout.
SEEDS_DIR = Path(os.environ.get("KV_SEEDS_DIR", Path(__file__).resolve().parents[3] / "shared" / "seeds"))


def rfc3339(value: object) -> bool:
    return (
        isinstance(value, str) and dt.datetime.fromisoformat(value.replace("Z", "+00:00")).tzinfo is not None
    )


@dataclass(frozen=True)
class Example:
    """A curl command from a seed README and what the README says it answers."""

    seed: str
    command: str
    status: int
    fields: dict[str, Any] = field(default_factory=dict)
    checks: dict[str, Callable[[object], bool]] = field(default_factory=dict)


STORED = "Key-value pair stored successfully"

# In README order; each seed's examples run in sequence on a store where their keys are absent.
EXAMPLES = [
    # 000: "Set key foo", "Get key foo", "Delete key foo".
    Example("000", "curl -X PUT localhost:5000/kv/foo -d 'bar'", 201, {"key": "foo", "value": "bar"}),
    Example("000", "curl localhost:5000/kv/foo", 200, {"key": "foo", "value": "bar", "version": 1}),
    Example("000", "curl -X DELETE localhost:5000/kv/foo", 200, {"key": "foo"}),
    # 002: PUT answers {"key", "value", "message"}, GET {"key", "value"}.
    Example(
        "002",
        """curl -X PUT http://localhost:8080/kv/mykey \\
  -H "Content-Type: application/json" \\
  -d '{"value": "myvalue"}'""",
        201,
        {"key": "mykey", "value": "myvalue", "message": STORED},
    ),
    Example("002", "curl http://localhost:8080/kv/mykey", 200, {"key": "mykey", "value": "myvalue"}),
    Example("002", "curl -X DELETE http://localhost:8080/kv/mykey", 200, {"key": "mykey"}),
    Example("002", "curl http://localhost:8080/status", 200),
    # 003: "Returns: 201 Created" with version 1 and status "created"; 200 with the value.
    Example(
        "003",
        """curl -X POST http://localhost:8080/set \\
    -H "Content-Type: application/json" \\
    -d '{"key":"mykey","value":"myvalue"}'""",
        201,
        {"key": "mykey", "value": "myvalue", "version": 1, "status": "created"},
    ),
    Example(
        "003",
        'curl "http://localhost:8080/get?key=mykey"',
        200,
        {"key": "mykey", "value": "myvalue", "version": 1},
    ),
    Example(
        "003",
        'curl "http://localhost:8080/local_read?key=mykey"',
        200,
        {"key": "mykey", "value": "myvalue", "version": 1},
    ),
    Example("003", "curl http://localhost:8080/health", 200, {"status": "healthy"}, {"time": rfc3339}),
    Example(
        "003",
        """curl -X POST http://localhost:8080/set \\
  -H "Content-Type: application/json" \\
  -d '{"key":"test","value":"hello"}'""",
        201,
        {"key": "test", "value": "hello", "version": 1, "status": "created"},
    ),
    Example(
        "003",
        'curl "http://localhost:8080/get?key=test"',
        200,
        {"key": "test", "value": "hello", "version": 1},
    ),
    Example(
        "003",
        'curl "http://localhost:8080/local_read?key=test"',
        200,
        {"key": "test", "value": "hello", "version": 1},
    ),
    Example("003", "curl http://localhost:8080/health", 200, {"status": "healthy"}, {"time": rfc3339}),
]
SEED_KEYS = ("foo", "mykey", "test")
_HOST = re.compile(r"localhost:(5000|8080)")


def run_example(gateway: Gateway, command: str) -> tuple[int, bytes]:
    """The command through bash, exactly as written but for host:port; (HTTP status, body)."""
    runnable = _HOST.sub(gateway.host, command) + " -sS -w '\\n%{http_code}'"
    done = subprocess.run(["bash", "-c", runnable], capture_output=True, timeout=30, check=False)  # noqa: S603
    assert done.returncode == 0, (command, done.stderr.decode(errors="replace"))
    body, _, status = done.stdout.rpartition(b"\n")
    return int(status), body


def assert_documented(body: bytes, example: Example) -> None:
    document = json.loads(body)
    assert isinstance(document, dict), body
    for name, expected in example.fields.items():
        assert name in document, (example.command, body)
        assert document[name] == expected, (example.command, name, body)
        assert type(document[name]) is type(expected), (example.command, name, body)
    for name, check in example.checks.items():
        assert check(document.get(name)), (example.command, name, body)


@pytest.mark.parametrize("seed", sorted({example.seed for example in EXAMPLES}))
def test_seed_curl_examples_as_written(gateway: Gateway, seed: str) -> None:
    gateway.delete(*SEED_KEYS)
    try:
        for example in (e for e in EXAMPLES if e.seed == seed):
            status, body = run_example(gateway, example.command)
            assert status == example.status, (example.command, status, body)
            assert_documented(body, example)
    finally:
        gateway.delete(*SEED_KEYS)


def test_seed_000_get_after_delete_is_404_and_all_is_one_json_object(gateway: Gateway) -> None:
    gateway.delete("foo")
    assert run_example(gateway, "curl -X PUT localhost:5000/kv/foo -d 'bar'")[0] == 201
    status, body = gateway.curl(f"http://{gateway.host}/all")
    assert status == 200
    pairs = json.loads(body)
    assert isinstance(pairs, dict)
    assert pairs["foo"] == "bar"
    assert all(isinstance(value, str) for value in pairs.values())
    assert run_example(gateway, "curl -X DELETE localhost:5000/kv/foo")[0] == 200
    status, body = run_example(gateway, "curl localhost:5000/kv/foo")
    assert status == 404
    assert json.loads(body)["code"] == 5


def test_seed_002_health(gateway: Gateway) -> None:
    status, body = gateway.curl(f"http://{gateway.host}/health")
    assert status == 200
    assert json.loads(body)["status"] == "healthy"


def test_seed_003_absent_key_is_404(gateway: Gateway, keyspace: str) -> None:
    for route in ("get", "local_read"):
        status, body = gateway.curl(f"http://{gateway.host}/{route}?key={keyspace}absent")
        assert status == 404, (route, body)
        assert json.loads(body)["code"] == 5


def test_seed_001_keys_created_updated_read_deleted(gateway: Gateway, keyspace: str) -> None:
    """PUT /keys/{key}: raw body; 201 for a new key, 200 for an update, 400 when malformed.
    GET: 200 with the value as the body, 404 when absent. DELETE: 200, 404 when absent.
    GET /keys: 200 with a JSON object of every pair."""
    url = f"http://{gateway.host}/keys/{keyspace}k1"
    assert gateway.curl("-X", "PUT", url, "-d", "first value")[0] == 201
    assert gateway.curl("-X", "PUT", url, "-d", "second value")[0] == 200
    assert gateway.curl(url) == (200, b"second value")
    status, body = gateway.curl(f"http://{gateway.host}/keys")
    assert status == 200
    assert json.loads(body)[f"{keyspace}k1"] == "second value"
    assert gateway.curl("-X", "DELETE", url)[0] == 200
    assert gateway.curl(url)[0] == 404
    assert gateway.curl("-X", "DELETE", url)[0] == 404
    # Malformed: no key, a key over the limit, an unknown parameter.
    assert gateway.curl("-X", "PUT", f"http://{gateway.host}/keys/", "-d", "v")[0] == 400
    assert gateway.curl("-X", "PUT", f"http://{gateway.host}/keys/{'k' * 4097}", "-d", "v")[0] == 400
    assert gateway.curl("-X", "PUT", f"{url}?colour=red", "-d", "v")[0] == 400
    assert gateway.stored(f"{keyspace}k1") is None


def test_seed_001_raw_value_round_trips_with_its_content_type(gateway: Gateway, keyspace: str) -> None:
    path = f"/keys/{keyspace}doc"
    reply = gateway.request("PUT", path, b"\x00\xffbinary", {"content-type": "image/png"})
    assert reply.status == 201
    reply = gateway.request("GET", path)
    assert (reply.status, reply.content_type, reply.body) == (200, "image/png", b"\x00\xffbinary")


def test_seed_004_put_get_delete(gateway: Gateway, keyspace: str) -> None:
    """POST /put adds a pair, GET /get?key= reads it, DELETE /delete?key= removes it."""
    key = f"{keyspace}name"
    status, body = gateway.curl(
        "-X", "POST", f"http://{gateway.host}/put", "-d", json.dumps({"key": key, "value": "GoLang"})
    )
    assert status == 201
    status, body = gateway.curl(f"http://{gateway.host}/get?key={key}")
    assert status == 200
    assert json.loads(body) == {"key": key, "value": "GoLang", "version": 1}
    assert gateway.curl("-X", "DELETE", f"http://{gateway.host}/delete?key={key}")[0] == 200
    assert gateway.curl("-X", "DELETE", f"http://{gateway.host}/delete?key={key}")[0] == 404
    assert gateway.curl(f"http://{gateway.host}/get?key={key}")[0] == 404


def seed_curl_commands(directory: Path) -> list[tuple[str, str]]:
    """(seed, command) for every curl command in the seed READMEs, continuation lines joined."""
    found = []
    for path in sorted(directory.glob("*.txt")):
        lines = path.read_text().splitlines()
        index = 0
        while index < len(lines):
            if lines[index].strip().startswith("curl"):
                command = [lines[index].strip()]
                while command[-1].endswith("\\") and index + 1 < len(lines):
                    index += 1
                    command.append(lines[index].strip())
                found.append((path.name[:3], " ".join(command)))
            index += 1
    return found


def normalised(command: str) -> str:
    return " ".join(command.replace("\\\n", " ").replace("\\", " ").split())


def test_every_seed_curl_example_is_here() -> None:
    if not SEEDS_DIR.is_dir():
        pytest.fail(f"the seed READMEs are not at {SEEDS_DIR} (set KV_SEEDS_DIR)")
    in_readmes = [(seed, normalised(command)) for seed, command in seed_curl_commands(SEEDS_DIR)]
    here = [(example.seed, normalised(example.command)) for example in EXAMPLES]
    assert in_readmes == here
