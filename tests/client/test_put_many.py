"""put_many (Client and AsyncClient) and `kv load`, against a real kv-server process (the
`kv_server` fixture): per-item results in order, per-item Conflict while the others apply,
whole-call InvalidArgument naming the item with nothing written, batches, and the CLI's output
and exit statuses."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest

from kvclient import AsyncClient, Client, Conflict, InvalidArgument, KeyNotFound, PutResult
from kvclient.models import PutItem, PutManyResult, PutOutcome
from kvtest import ServerProcess

KV = Path(sys.executable).parent / "kv"


def kv(*args: str, address: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    environment = {**os.environ, "KV_ADDRESS": address}
    environment.pop("KV_TOKEN", None)
    return subprocess.run(  # noqa: S603
        [str(KV), *args], input=stdin, capture_output=True, env=environment, timeout=60, check=False
    )


def check_mixed_batch(result: PutManyResult) -> None:
    """The outcome of MIXED below, on a store that held only `mixed/taken`."""
    assert isinstance(result, PutManyResult)
    assert [outcome.key for outcome in result] == ["mixed/a", "mixed/taken", "mixed/b", "mixed/a"]
    assert [outcome.ok for outcome in result] == [True, False, True, True]
    assert result.applied == 3
    assert [outcome.key for outcome in result.failed] == ["mixed/taken"]
    error = result[1].error
    assert isinstance(error, Conflict)
    assert "mixed/taken" in str(error)
    with pytest.raises(Conflict):
        result[1].unwrap()
    first, _, second, again = (outcome.result for outcome in result)
    assert isinstance(first, PutResult)
    assert isinstance(second, PutResult)
    assert isinstance(again, PutResult)
    assert first.entry.value == b"1"
    assert first.created
    assert second.entry.value == b"\x00\xff"
    assert second.entry.expires_at is not None
    assert again.revision == second.revision + 1 == first.revision + 2
    assert not again.created
    assert again.prev_entry is not None
    assert again.prev_entry.value == b"1"
    assert result.revision == again.revision


MIXED: list[PutItem | tuple[str, str]] = [
    ("mixed/a", "1"),
    PutItem("mixed/taken", "no", if_absent=True),
    PutItem("mixed/b", b"\x00\xff", ttl=timedelta(minutes=5)),
    PutItem("mixed/a", "2", return_previous=True),
]


def test_client_put_many_returns_one_outcome_per_item_in_order(kv_server: ServerProcess) -> None:
    with Client(kv_server.address) as client:
        client.put("mixed/taken", "yes")
        check_mixed_batch(client.put_many(MIXED))
        assert client.get("mixed/a").text == "2"
        assert client.get("mixed/taken").text == "yes"


def test_async_client_put_many_returns_one_outcome_per_item_in_order(kv_server: ServerProcess) -> None:
    async def scenario() -> None:
        async with AsyncClient(kv_server.address) as client:
            await client.put("mixed/taken", "yes")
            check_mixed_batch(await client.put_many(MIXED))
            assert (await client.get("mixed/b")).value == b"\x00\xff"

    asyncio.run(scenario())


def test_put_many_sends_batches_of_batch_size(kv_server: ServerProcess) -> None:
    items = [(f"many/{index:03d}", str(index)) for index in range(25)]
    with Client(kv_server.address) as client:
        result = client.put_many(items, batch_size=10)
        assert len(result) == 25
        assert [outcome.unwrap().revision for outcome in result] == list(range(1, 26))
        assert result.revision == 25
        assert client.list("many/").keys() == [key for key, _ in items]
        assert client.put_many([]).outcomes == ()  # nothing to send: no call


@pytest.mark.parametrize(
    ("items", "message"),
    [
        ([("ok", "v"), ("", "v")], "items[1]: key must not be empty"),
        ([("ok", "v"), PutItem("k", "v", ttl=-1)], "items[1]: ttl must be"),
        ([("ok", "v"), ("k" * 5000, "v")], "puts[1].key: 5000 bytes is over the limit"),
        ([PutItem("a", "v", if_absent=True, if_present=True)], "puts[0].if_absent: contradicts"),
    ],
)
def test_an_invalid_item_fails_the_call_naming_it_and_writes_nothing(
    kv_server: ServerProcess, items: list[PutItem | tuple[str, str]], message: str
) -> None:
    with Client(kv_server.address) as client:
        with pytest.raises(InvalidArgument) as refused:
            client.put_many(items)
        assert str(refused.value).startswith(message)
        with pytest.raises(KeyNotFound):
            client.get("ok")
        assert client.status().revision == 0


def test_put_many_rejects_a_bad_batch_size_and_bad_items(kv_server: ServerProcess) -> None:
    with Client(kv_server.address) as client:
        for size in (0, 1001, True):
            with pytest.raises(InvalidArgument):
                client.put_many([("k", "v")], batch_size=size)
        with pytest.raises(TypeError, match=r"items\[0\]"):
            client.put_many(["just-a-key"])  # type: ignore[list-item]


def test_outcome_unwrap(kv_server: ServerProcess) -> None:
    with Client(kv_server.address) as client:
        (outcome,) = client.put_many([PutItem("u", "v")])
        assert isinstance(outcome, PutOutcome)
        assert outcome.unwrap().entry.key == "u"


# --------------------------------------------------------------------------- kv load


def jsonl(*objects: object) -> bytes:
    return "".join(json.dumps(obj) + "\n" for obj in objects).encode()


def test_kv_load_writes_every_line_in_batches(kv_server: ServerProcess, tmp_path: Path) -> None:
    path = tmp_path / "keys.jsonl"
    lines = [{"key": f"load/{index:04d}", "value": f"v{index}"} for index in range(1200)]
    path.write_bytes(
        jsonl(*lines[:600]) + b"\n" + jsonl(*lines[600:], {"key": "load/t", "value": "x", "ttl": 60})
    )
    done = kv("load", str(path), address=kv_server.address)
    assert done.returncode == 0, done.stderr
    assert done.stdout.decode() == "loaded 1201 keys in 3 batches (revision 1201)\n"
    with Client(kv_server.address) as client:
        assert client.get("load/0599").text == "v599"
        assert client.get("load/1199").mod_revision == 1200
        expiring = client.get("load/t")
        assert expiring.expires_at is not None
        assert len(client.list("load/", keys_only=True)) == 1201


def test_kv_load_from_stdin_with_json_output_and_refusals(kv_server: ServerProcess) -> None:
    with Client(kv_server.address) as client:
        client.put("cli/b", "old")
    data = jsonl(*({"key": f"cli/{name}", "value": "new"} for name in "abc"))
    done = kv(
        "load", "-", "--if-absent", "--batch-size", "2", "-o", "json", stdin=data, address=kv_server.address
    )
    assert done.returncode == 3  # a condition failed: kv's exit status for Conflict
    report = json.loads(done.stdout)
    assert report["loaded"] == 2
    assert report["failed"] == 1
    assert report["batches"] == 2
    assert report["revision"] == 3
    (failure,) = report["failures"]
    assert failure["line"] == 2
    assert failure["key"] == "cli/b"
    assert failure["code"] == "ABORTED"
    assert b"<stdin>:2: cli/b: condition failed" in done.stderr
    with Client(kv_server.address) as client:
        assert client.get("cli/b").text == "old"
        assert client.get("cli/c").text == "new"


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b'{"key": "a", "value": "1"}\nnot json\n', "<stdin>:2: not JSON"),
        (b'{"key": "a", "value": 5}\n', '<stdin>:1: "value" must be a string'),
        (b'{"key": "a", "value": "1", "colour": "red"}\n', "<stdin>:1: unknown field(s) 'colour'"),
        (b'{"key": "a", "value": "1", "ttl": -1}\n', '<stdin>:1: "ttl" must be a positive'),
        (b'["a", "1"]\n', "<stdin>:1: expected a JSON object"),
        (
            b'{"key": "a", "value": "1"}\n{"key": "' + b"k" * 5000 + b'", "value": "1"}\n',
            "<stdin>:2: key: 5000",
        ),
    ],
)
def test_kv_load_stops_at_a_bad_line_with_exit_2_and_writes_nothing_of_its_batch(
    kv_server: ServerProcess, data: bytes, message: str
) -> None:
    done = kv("load", "-", stdin=data, address=kv_server.address)
    assert done.returncode == 2
    assert done.stderr.decode().startswith(f"kv: {message}")
    assert b"Traceback" not in done.stderr
    with Client(kv_server.address) as client:
        assert client.status().revision == 0


def test_kv_load_usage_errors(kv_server: ServerProcess, tmp_path: Path) -> None:
    for args in (["load"], ["load", "-", "--batch-size", "0"], ["load", "-", "--batch-size", "1001"]):
        done = kv(*args, address=kv_server.address)
        assert done.returncode == 2
        assert b"usage:" in done.stderr
    missing = kv("load", str(tmp_path / "missing.jsonl"), address=kv_server.address)
    assert missing.returncode == 2
    assert b"cannot read" in missing.stderr
