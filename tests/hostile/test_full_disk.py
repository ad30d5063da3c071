"""A full disk: the SQLite file on a small tmpfs, filled with Puts until writes fail.

While the disk is full, writes must fail with UNAVAILABLE and a message that says the storage is
full, change nothing, and leave the server up, healthy for reads (Get, List, Watch replay, Status
and health keep answering). When space returns (a ballast file deleted, then the tmpfs remounted
bigger), writes must succeed again without a restart. No acknowledged write may be lost, no
failed write may appear, and after a kill -9 and a restart the file must pass
`PRAGMA integrity_check` with every acknowledged write in it.

Mounting needs root, which CI has: without it the test fails, it does not skip.
"""

from __future__ import annotations

import contextlib
import os
import re
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from kv.compat.v1 import compat_pb2, compat_pb2_grpc
from kv.v1 import kv_pb2, kv_pb2_grpc
from kvtest import ServerProcess

TMPFS_SIZE = "4m"
BIGGER_SIZE = "16m"
BALLAST_BYTES = 512 * 1024
# Values shrink as the disk fills, so that the last writes squeeze out the last free pages.
FILL_SIZES = [64 * 1024, 8 * 1024, 512]
FAILURES_PER_SIZE = 3
MAX_FILL_WRITES = 2000
TIMEOUT_S = 10.0
FULL_MESSAGE = re.compile(r"full|no space", re.IGNORECASE)


@contextlib.contextmanager
def tmpfs(directory: Path, size: str) -> Iterator[Path]:
    directory.mkdir()
    mounted = subprocess.run(  # noqa: S603
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(directory)],
        capture_output=True,
        text=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.fail(
            f"this test mounts a {size} tmpfs and must run as root (CI does): uid {os.getuid()}, "
            f"mount said: {mounted.stderr.strip()}"
        )
    try:
        yield directory
    finally:
        unmounted = subprocess.run(["umount", str(directory)], capture_output=True, check=False)  # noqa: S603
        if unmounted.returncode != 0:
            subprocess.run(["umount", "-l", str(directory)], capture_output=True, check=False)  # noqa: S603


def remount(directory: Path, size: str) -> None:
    subprocess.run(["mount", "-o", f"remount,size={size}", str(directory)], check=True)  # noqa: S603


class Writer:
    """Puts with a ledger: what was acknowledged (key -> revision) and what failed."""

    def __init__(self, stub: kv_pb2_grpc.KeyValueStub) -> None:
        self.stub = stub
        self.acknowledged: dict[str, int] = {}
        self.failed: dict[str, tuple[grpc.StatusCode, str]] = {}
        self.count = 0

    def next_key(self) -> str:
        self.count += 1
        return f"k{self.count:06d}"

    def put(self, size: int) -> bool:
        key = self.next_key()
        try:
            response = self.stub.Put(
                kv_pb2.PutRequest(key=key, value_bytes=os.urandom(size)), timeout=TIMEOUT_S
            )
        except grpc.RpcError as error:
            self.failed[key] = (error.code(), str(error.details()))
            return False
        self.acknowledged[key] = response.header.revision
        return True

    def fill(self) -> None:
        """Put until even the smallest values fail, again and again."""
        written = 0
        for size in FILL_SIZES:
            failures = 0
            while failures < FAILURES_PER_SIZE:
                assert written < MAX_FILL_WRITES, "the disk never filled up"
                written += 1
                failures = 0 if self.put(size) else failures + 1

    def concurrent_puts(self, count: int) -> list[bool]:
        """`count` small Puts at once (the server commits them together)."""
        keys = [self.next_key() for _ in range(count)]
        calls = [
            self.stub.Put.future(kv_pb2.PutRequest(key=key, value="small"), timeout=TIMEOUT_S) for key in keys
        ]
        outcomes = []
        for key, call in zip(keys, calls, strict=True):
            try:
                self.acknowledged[key] = call.result().header.revision
                outcomes.append(True)
            except grpc.RpcError as error:
                self.failed[key] = (error.code(), str(error.details()))
                outcomes.append(False)
        return outcomes


def assert_failures_are_clear(writer: Writer) -> None:
    assert writer.failed, "no write failed"
    unclear = {
        key: (code.name, details)
        for key, (code, details) in writer.failed.items()
        if code != grpc.StatusCode.UNAVAILABLE or not FULL_MESSAGE.search(details)
    }
    assert not unclear, f"writes failed without saying the storage is full: {unclear}"


def list_all(stub: kv_pb2_grpc.KeyValueStub) -> dict[str, kv_pb2.Entry]:
    stored: dict[str, kv_pb2.Entry] = {}
    token = ""
    for _ in range(10_000):
        page = stub.List(
            kv_pb2.ListRequest(page_size=100, page_token=token, keys_only=True), timeout=TIMEOUT_S
        )
        stored.update((entry.key, entry) for entry in page.entries)
        token = page.next_page_token
        if not token:
            return stored
    raise AssertionError("the listing did not end")


def assert_ledger_holds(stub: kv_pb2_grpc.KeyValueStub, writer: Writer) -> None:
    """Every acknowledged write is there with its revision; no failed write is."""
    stored = list_all(stub)
    lost = [
        key
        for key, revision in writer.acknowledged.items()
        if stored.get(key, kv_pb2.Entry()).mod_revision != revision
    ]
    assert not lost, f"{len(lost)} acknowledged writes lost or changed, e.g. {lost[:5]}"
    appeared = [key for key in writer.failed if key in stored]
    assert not appeared, f"{len(appeared)} failed writes were applied anyway, e.g. {appeared[:5]}"


def assert_reads_work(channel: grpc.Channel, writer: Writer) -> None:
    stub = kv_pb2_grpc.KeyValueStub(channel)
    some_key, revision = next(iter(writer.acknowledged.items()))
    assert stub.Get(kv_pb2.GetRequest(key=some_key), timeout=TIMEOUT_S).entry.mod_revision == revision
    status = stub.Status(kv_pb2.StatusRequest(), timeout=TIMEOUT_S)
    assert status.header.revision >= max(writer.acknowledged.values())
    assert status.key_count == len(writer.acknowledged)
    call = stub.Watch(kv_pb2.WatchRequest(key=some_key, start_revision=1), timeout=TIMEOUT_S)
    try:
        first = next(iter(call))
        assert [event.entry.mod_revision for event in first.events] == [revision]
    finally:
        call.cancel()  # type: ignore[no-untyped-call]  # grpc-stubs leaves cancel() untyped
    assert_ledger_holds(stub, writer)
    compat = compat_pb2_grpc.CompatServiceStub(channel)
    assert compat.Get(compat_pb2.GetRequest(key=some_key), timeout=TIMEOUT_S).version == 1
    assert compat.Health(compat_pb2.HealthRequest(), timeout=TIMEOUT_S).status == "healthy"
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "kv.v1.KeyValue"):
        # Reads are still served: the server stays in rotation, each write says why it failed.
        answer = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=TIMEOUT_S)
        assert answer.status == health_pb2.HealthCheckResponse.SERVING


def integrity_check(path: Path) -> str:
    connection = sqlite3.connect(path)
    try:
        return str(connection.execute("PRAGMA integrity_check").fetchone()[0])
    finally:
        connection.close()


def test_a_full_disk_fails_writes_clearly_keeps_reads_and_recovers_without_a_restart(tmp_path: Path) -> None:
    started = time.monotonic()
    with tmpfs(tmp_path / "disk", TMPFS_SIZE) as disk:
        ballast = disk / "ballast"
        ballast.write_bytes(b"\0" * BALLAST_BYTES)
        server = ServerProcess(tmp_path)  # its log stays off the small disk
        server.db_path = disk / "kv.db"
        server.start()
        try:
            with grpc.insecure_channel(server.address) as channel:
                stub = kv_pb2_grpc.KeyValueStub(channel)
                writer = Writer(stub)

                # Full, with space coming back from a deleted ballast file.
                writer.fill()
                assert len(writer.acknowledged) > 10, "the disk filled up before any write"
                assert not any(writer.concurrent_puts(8)), "a write succeeded on a full disk"
                assert_failures_are_clear(writer)
                time.sleep(2.5)  # a round of the server's own health check
                assert server.process is not None
                assert server.process.poll() is None, "the server died"
                assert_reads_work(channel, writer)
                acknowledged_when_full = len(writer.acknowledged)
                ballast.unlink()
                assert writer.put(512), f"no write after the ballast was deleted: {writer.failed}"
                assert all(writer.concurrent_puts(8))

                # Full again, with space coming back from a bigger tmpfs.
                writer.fill()
                assert_failures_are_clear(writer)
                assert_reads_work(channel, writer)
                remount(disk, BIGGER_SIZE)
                assert all(writer.concurrent_puts(8)), f"no write after the remount: {writer.failed}"
                assert writer.put(64 * 1024)
                assert_reads_work(channel, writer)

            # And all of it is durable: kill -9, check the file, start again.
            server.kill()
            assert integrity_check(server.db_path) == "ok"
            server.start()
            with grpc.insecure_channel(server.address) as channel:
                assert_ledger_holds(kv_pb2_grpc.KeyValueStub(channel), writer)
        finally:
            server.kill()
    unexpected = [line for line in server.log().splitlines() if "unexpected" in line or "Traceback" in line]
    assert not unexpected, "\n".join(unexpected[:20])
    print(
        f"\nfull disk: {acknowledged_when_full} writes filled {TMPFS_SIZE}; {len(writer.acknowledged)}"
        f" acknowledged and {len(writer.failed)} failed in all, in {time.monotonic() - started:.1f} s;"
        f" e.g. {next(iter(writer.failed.values()))}"
    )
