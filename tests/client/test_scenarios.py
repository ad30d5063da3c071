"""One scenario suite, run through the sync Client, the AsyncClient and the `kv` CLI against a real
kv-server (the `kv_server` fixture): put/get/delete, listings over pages, conditional writes, TTL,
watches with resume, and a watch that survives a server restart mid-stream, delivering every event
exactly once.

Each driver exposes the same small blocking interface and returns kvclient's dataclasses and
raises kvclient's exceptions; the CLI driver builds them from `kv -o json` and the exit status.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Coroutine, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any, ClassVar, Protocol, TypeVar

import pytest

import kvclient
from kvclient import (
    AsyncClient,
    Client,
    Conflict,
    DeleteResult,
    Entry,
    EventType,
    InvalidArgument,
    KeyNotFound,
    KvError,
    ListResult,
    PutResult,
    ServerStatus,
    WatchEvent,
)
from kvtest import ServerProcess

KV = Path(sys.executable).parent / "kv"
T = TypeVar("T")
EVENT_TIMEOUT_S = 15.0


class WatchHandle(Protocol):
    def next(self, timeout: float = EVENT_TIMEOUT_S) -> WatchEvent: ...

    def expect_nothing(self, wait: float) -> None: ...

    def close(self) -> None: ...


class Driver(Protocol):
    name: str

    def put(self, key: str, value: str | bytes, **options: Any) -> PutResult: ...

    def get(self, key: str) -> Entry: ...

    def delete(self, key: str, **options: Any) -> DeleteResult: ...

    def list(self, prefix: str = "", **options: Any) -> ListResult: ...

    def watch(self, key: str = "", **options: Any) -> WatchHandle: ...

    def status(self) -> ServerStatus: ...

    def close(self) -> None: ...


# --------------------------------------------------------------------------- watch handles


class QueueWatch:
    """Events (or the error that ended the watch) pushed into a queue by a background reader."""

    def __init__(self, stop: Callable[[], None]) -> None:
        self.items: queue.Queue[WatchEvent | BaseException] = queue.Queue()
        self._stop = stop

    def next(self, timeout: float = EVENT_TIMEOUT_S) -> WatchEvent:
        try:
            item = self.items.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no watch event within {timeout} s") from None
        if isinstance(item, BaseException):
            raise item
        return item

    def expect_nothing(self, wait: float) -> None:
        try:
            item = self.items.get(timeout=wait)
        except queue.Empty:
            return
        raise AssertionError(f"unexpected watch item: {item!r}")

    def close(self) -> None:
        self._stop()


# --------------------------------------------------------------------------- drivers


class SyncDriver:
    name = "sync"

    def __init__(self, address: str) -> None:
        self.client = Client(address)

    def put(self, key: str, value: str | bytes, **options: Any) -> PutResult:
        return self.client.put(key, value, **options)

    def get(self, key: str) -> Entry:
        return self.client.get(key)

    def delete(self, key: str, **options: Any) -> DeleteResult:
        return self.client.delete(key, **options)

    def list(self, prefix: str = "", **options: Any) -> ListResult:
        return self.client.list(prefix, **options)

    def status(self) -> ServerStatus:
        return self.client.status()

    def watch(self, key: str = "", **options: Any) -> WatchHandle:
        watch = self.client.watch(key, **options)
        handle = QueueWatch(watch.close)

        def pump() -> None:
            try:
                for event in watch:
                    handle.items.put(event)
            except BaseException as error:
                handle.items.put(error)

        thread = threading.Thread(target=pump, daemon=True)
        thread.start()

        def stop() -> None:
            watch.close()
            thread.join(10)
            assert not thread.is_alive()

        handle._stop = stop
        return handle

    def close(self) -> None:
        self.client.close()


class AsyncDriver:
    """The AsyncClient on an event loop of its own thread (so watches run beside the calls)."""

    name = "async"

    def __init__(self, address: str) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.client = AsyncClient(address)
        self._run(self.client.__aenter__())

    def _run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(60)

    def put(self, key: str, value: str | bytes, **options: Any) -> PutResult:
        return self._run(self.client.put(key, value, **options))

    def get(self, key: str) -> Entry:
        return self._run(self.client.get(key))

    def delete(self, key: str, **options: Any) -> DeleteResult:
        return self._run(self.client.delete(key, **options))

    def list(self, prefix: str = "", **options: Any) -> ListResult:
        return self._run(self.client.list(prefix, **options))

    def status(self) -> ServerStatus:
        return self._run(self.client.status())

    def watch(self, key: str = "", **options: Any) -> WatchHandle:
        handle = QueueWatch(lambda: None)

        async def pump() -> None:
            try:
                async with self.client.watch(key, **options) as watch:
                    async for event in watch:
                        handle.items.put(event)
            except asyncio.CancelledError:
                raise
            except BaseException as error:
                handle.items.put(error)

        future = asyncio.run_coroutine_threadsafe(pump(), self.loop)

        def stop() -> None:
            future.cancel()
            deadline = time.monotonic() + 10
            while not future.done() and time.monotonic() < deadline:
                time.sleep(0.01)
            assert future.done()

        handle._stop = stop
        return handle

    def close(self) -> None:
        self._run(self.client.close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


def _entry(obj: dict[str, Any]) -> Entry:
    text: str = obj.get("value", "")
    value = base64.b64decode(obj["value_bytes"]) if "value_bytes" in obj else text.encode()
    expires = obj.get("expires_at")
    return Entry(
        key=obj["key"],
        value=value,
        create_revision=obj["create_revision"],
        mod_revision=obj["mod_revision"],
        version=obj["version"],
        expires_at=datetime.fromisoformat(expires) if expires else None,
        content_type=obj.get("content_type", ""),
    )


class CliDriver:
    """`kv ... -o json` as a subprocess; exit statuses become kvclient exceptions."""

    name = "cli"
    ERRORS: ClassVar[dict[int, type[KvError]]] = {1: KeyNotFound, 2: InvalidArgument, 3: Conflict, 4: KvError}

    def __init__(self, address: str) -> None:
        self.env = {**os.environ, "KV_ADDRESS": address}
        self.env.pop("KV_TOKEN", None)

    def run(self, *args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(  # noqa: S603
            [str(KV), *args], input=stdin, capture_output=True, env=self.env, timeout=60, check=False
        )

    def json(self, *args: str, stdin: bytes | None = None) -> dict[str, Any]:
        done = self.run(*args, "-o", "json", stdin=stdin)
        stderr = done.stderr.decode()
        if done.returncode != 0:
            assert "Traceback" not in stderr
            assert stderr.startswith("kv: "), stderr
            assert stderr.count("\n") == 1, stderr
            raise self.ERRORS.get(done.returncode, KvError)(stderr[4:].strip())
        assert stderr == ""
        result: dict[str, Any] = json.loads(done.stdout)
        return result

    def put(self, key: str, value: str | bytes, **options: Any) -> PutResult:
        args = ["put", key]
        stdin = None
        if isinstance(value, bytes):
            args.append("-")
            stdin = value
        else:
            args.append(value)
        ttl = options.pop("ttl", None)
        if ttl is not None:
            args += ["--ttl", str(ttl)]
        content_type = options.pop("content_type", None)
        if content_type is not None:
            args += ["--content-type", content_type]
        for name in ("if_absent", "if_present"):
            if options.pop(name, False):
                args.append("--" + name.replace("_", "-"))
        for name in ("if_mod_revision", "if_version"):
            revision = options.pop(name, None)
            if revision is not None:
                args += ["--" + name.replace("_", "-"), str(revision)]
        if options.pop("return_previous", False):
            args.append("--prev")
        assert not options, options
        obj = self.json(*args, stdin=stdin)
        encoded = value if isinstance(value, bytes) else value.encode()
        return PutResult(
            revision=obj["revision"],
            created=obj["created"],
            entry=_entry({**obj, "value_bytes": base64.b64encode(encoded).decode()}),
            prev_entry=_entry(obj["prev_entry"]) if "prev_entry" in obj else None,
        )

    def get(self, key: str) -> Entry:
        return _entry(self.json("get", key))

    def delete(self, key: str, **options: Any) -> DeleteResult:
        args = ["delete", key]
        if options.pop("prefix", False):
            args.append("--prefix")
        if options.pop("allow_missing", False):
            args.append("--allow-missing")
        if options.pop("return_previous", False):
            args.append("--prev")
        for name in ("if_mod_revision", "if_version"):
            value = options.pop(name, None)
            if value is not None:
                args += ["--" + name.replace("_", "-"), str(value)]
        assert not options, options
        obj = self.json(*args)
        previous = tuple(_entry(e) for e in obj.get("prev_entries", []))
        return DeleteResult(revision=obj["revision"], deleted=obj["deleted"], prev_entries=previous)

    def list(self, prefix: str = "", **options: Any) -> ListResult:
        args = ["list", "--prefix", prefix]
        if options.pop("keys_only", False):
            args.append("--keys-only")
        for name in ("limit", "page_size"):
            value = options.pop(name, None)
            if value is not None:
                args += ["--" + name.replace("_", "-"), str(value)]
        assert not options, options
        obj = self.json(*args)
        return ListResult(
            entries=tuple(_entry(e) for e in obj["entries"]),
            revision=obj["revision"],
            count=obj.get("total"),
            truncated=obj["truncated"],
        )

    def status(self) -> ServerStatus:
        obj = self.json("status")
        limits = obj["limits"]
        return ServerStatus(
            revision=obj["revision"],
            server_version=obj["server_version"],
            server_id=obj["server_id"],
            store=obj["store"],
            compact_revision=obj["compact_revision"],
            key_count=obj["key_count"],
            limits=kvclient.Limits(
                max_key_bytes=limits["max_key_bytes"],
                max_value_bytes=limits["max_value_bytes"],
                default_page_size=limits["default_page_size"],
                max_page_size=limits["max_page_size"],
                default_progress_interval=limits["default_progress_interval_ms"] / 1000,
            ),
            started_at=datetime.fromisoformat(obj["started_at"]) if obj["started_at"] else None,
        )

    def watch(self, key: str = "", **options: Any) -> WatchHandle:
        args = ["watch", "-o", "json"]
        if options.pop("prefix", False):
            args += ["--prefix", key]
        else:
            args.append(key)
        start = options.pop("start_revision", None)
        if start is not None:
            args += ["--start-revision", str(start)]
        if options.pop("include_initial_state", False):
            args.append("--initial")
        if options.pop("include_previous", False):
            args.append("--prev")
        assert not options, options
        process = subprocess.Popen(  # noqa: S603
            [str(KV), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=self.env
        )
        handle = QueueWatch(lambda: None)

        def pump() -> None:
            assert process.stdout is not None
            for line in process.stdout:
                obj = json.loads(line)
                kind = EventType(obj["type"])
                if kind is EventType.PUT:
                    entry = _entry(obj)
                else:
                    entry = Entry(obj["key"], b"", 0, obj["revision"], 0)
                previous = _entry(obj["prev_entry"]) if "prev_entry" in obj else None
                handle.items.put(WatchEvent(kind, entry, previous, obj.get("initial", False)))
            process.wait()
            assert process.stderr is not None
            handle.items.put(KvError(f"kv watch ended: {process.returncode} {process.stderr.read()!r}"))

        thread = threading.Thread(target=pump, daemon=True)
        thread.start()

        def stop() -> None:
            try:
                if process.poll() is None:
                    process.send_signal(signal.SIGINT)  # Ctrl-C: exits 0, quietly
                    assert process.wait(15) == 0
                    thread.join(10)
                    assert process.stderr is not None
                    assert process.stderr.read() == b""
            finally:
                if process.poll() is None:
                    process.kill()
                    process.wait(5)
                for stream in (process.stdout, process.stderr):
                    if stream is not None:
                        stream.close()

        handle._stop = stop
        return handle

    def close(self) -> None:
        pass


DRIVERS: dict[str, Callable[[str], Driver]] = {"sync": SyncDriver, "async": AsyncDriver, "cli": CliDriver}


@pytest.fixture(params=list(DRIVERS))
def driver(request: pytest.FixtureRequest, kv_server: ServerProcess) -> Iterator[Driver]:
    made = DRIVERS[request.param](kv_server.address)
    try:
        yield made
    finally:
        made.close()


@pytest.fixture
def prefix() -> str:
    """A key prefix of this test's own."""
    return f"t-{uuid.uuid4().hex[:8]}/"


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


# --------------------------------------------------------------------------- scenarios


def test_put_get_roundtrip_of_text_binary_and_empty_values(driver: Driver, prefix: str) -> None:
    created = driver.put(prefix + "greeting", "héllo wörld")
    assert created.created
    assert created.entry.version == 1
    assert created.entry.create_revision == created.entry.mod_revision == created.revision
    entry = driver.get(prefix + "greeting")
    assert entry.text == "héllo wörld"
    assert entry.value == "héllo wörld".encode()
    assert entry.expires_at is None

    blob = bytes(range(256)) + b"\x00\xff\xfe"
    driver.put(prefix + "blob", blob)
    assert driver.get(prefix + "blob").value == blob

    driver.put(prefix + "empty", "")
    assert driver.get(prefix + "empty").value == b""

    driver.put(prefix + "doc", '{"a": 1}', content_type="application/json")
    doc = driver.get(prefix + "doc")
    assert (doc.content_type, doc.value) == ("application/json", b'{"a": 1}')
    assert driver.get(prefix + "blob").content_type == ""

    updated = driver.put(prefix + "greeting", b"bye")
    assert not updated.created
    assert updated.entry.version == 2
    assert updated.revision > created.revision
    again = driver.get(prefix + "greeting")
    assert (again.value, again.version, again.mod_revision) == (b"bye", 2, updated.revision)
    assert again.create_revision == created.revision

    with pytest.raises(KeyNotFound):
        driver.get(prefix + "missing")


def test_delete_single_missing_and_prefix(driver: Driver, prefix: str) -> None:
    for name in ("a", "b", "c"):
        driver.put(prefix + "dir/" + name, name)
    driver.put(prefix + "other", "x")

    result = driver.delete(prefix + "other")
    assert result.deleted == 1
    with pytest.raises(KeyNotFound):
        driver.get(prefix + "other")
    with pytest.raises(KeyNotFound):
        driver.delete(prefix + "other")
    assert driver.delete(prefix + "other", allow_missing=True).deleted == 0

    before = driver.status().revision
    result = driver.delete(prefix + "dir/", prefix=True, return_previous=True)
    assert result.deleted == 3
    assert result.revision == before + 3  # one revision per deleted key
    assert [e.key for e in result.prev_entries] == [prefix + "dir/" + n for n in ("a", "b", "c")]
    assert [e.value for e in result.prev_entries] == [b"a", b"b", b"c"]
    assert driver.list(prefix).entries == ()
    assert driver.delete(prefix + "dir/", prefix=True).deleted == 0


def test_list_walks_every_page_of_one_snapshot(driver: Driver, prefix: str) -> None:
    keys = [f"{prefix}k{i:02d}" for i in range(13)]
    for i, key in enumerate(reversed(keys)):
        driver.put(key, f"value {i}")
    driver.put(prefix[:-1] + "0", "outside the prefix")  # sorts right after the prefix range

    listing = driver.list(prefix, page_size=4)
    assert listing.keys() == keys
    assert listing.revision == driver.status().revision
    assert all(e.value.startswith(b"value ") for e in listing)
    assert not listing.truncated

    limited = driver.list(prefix, limit=5, page_size=3)
    assert limited.keys() == keys[:5]
    assert limited.truncated

    keys_only = driver.list(prefix, keys_only=True, page_size=5)
    assert keys_only.keys() == keys
    assert all(e.value == b"" and e.version == 1 for e in keys_only)

    one_page = driver.list(prefix)
    assert one_page.keys() == keys


def test_conditional_writes(driver: Driver, prefix: str) -> None:
    key = prefix + "lock"
    first = driver.put(key, "owner-a", if_absent=True)
    assert first.created
    with pytest.raises(Conflict):
        driver.put(key, "owner-b", if_absent=True)
    with pytest.raises(Conflict):
        driver.put(prefix + "absent", "x", if_present=True)
    with pytest.raises(KeyNotFound):
        driver.get(prefix + "absent")

    revision = driver.status().revision
    with pytest.raises(Conflict):
        driver.put(key, "stale", if_mod_revision=first.revision + 1000)
    with pytest.raises(Conflict):
        driver.put(key, "stale", if_version=7)
    assert driver.status().revision == revision  # a failed condition changes nothing
    assert driver.get(key).value == b"owner-a"

    swapped = driver.put(key, "owner-c", if_mod_revision=first.entry.mod_revision)
    assert swapped.entry.version == 2
    bumped = driver.put(key, "owner-d", if_version=2, if_present=True)
    assert bumped.entry.version == 3
    with pytest.raises(Conflict):
        driver.delete(key, if_version=2)
    assert driver.delete(key, if_mod_revision=bumped.revision).deleted == 1

    with pytest.raises(InvalidArgument):
        driver.put(key, "x", if_absent=True, if_version=1)


def test_ttl_expires_keys(driver: Driver, prefix: str) -> None:
    key = prefix + "session"
    result = driver.put(key, "token", ttl=1.5)
    entry = driver.get(key)
    assert entry.expires_at is not None
    remaining = entry.ttl()
    assert remaining is not None
    assert 0 < remaining <= 1.6
    assert result.entry.expires_at is not None
    assert abs((entry.expires_at - result.entry.expires_at).total_seconds()) < 0.01
    driver.put(prefix + "forever", "stays")

    def gone() -> bool:
        try:
            driver.get(key)
        except KeyNotFound:
            return True
        return False

    wait_until(gone, 10, "the key to expire")
    assert driver.list(prefix).keys() == [prefix + "forever"]


def test_watch_delivers_typed_events_and_resumes_without_repeats(driver: Driver, prefix: str) -> None:
    start = driver.status().revision + 1
    watch = driver.watch(prefix, prefix=True, start_revision=start, include_previous=True)
    try:
        a = driver.put(prefix + "a", "1")
        driver.put(prefix + "b", b"\x00\x01")
        driver.put(prefix + "a", "2")
        driver.delete(prefix + "a")
        driver.put("elsewhere/" + prefix, "not watched")
        driver.put(prefix + "ttl", "t", ttl=0.3)

        events = [watch.next() for _ in range(4)]
        assert [(e.type, e.key) for e in events] == [
            (EventType.PUT, prefix + "a"),
            (EventType.PUT, prefix + "b"),
            (EventType.PUT, prefix + "a"),
            (EventType.DELETE, prefix + "a"),
        ]
        assert events[0].revision == a.revision == start
        assert [e.revision for e in events] == [start, start + 1, start + 2, start + 3]
        assert events[1].entry.value == b"\x00\x01"
        assert events[2].entry.version == 2
        assert events[2].prev_entry is not None
        assert events[2].prev_entry.value == b"1"
        assert events[3].prev_entry is not None
        assert events[3].prev_entry.value == b"2"
        put_ttl = watch.next()
        assert (put_ttl.type, put_ttl.key) == (EventType.PUT, prefix + "ttl")
        expired = watch.next()
        assert (expired.type, expired.key) == (EventType.EXPIRE, prefix + "ttl")
        last = expired.revision
    finally:
        watch.close()

    # Resume from the revision after the last one seen: nothing is repeated, nothing is lost.
    driver.put(prefix + "c", "3")
    resumed = driver.watch(prefix, prefix=True, start_revision=last + 1)
    try:
        event = resumed.next()
        assert (event.key, event.revision) == (prefix + "c", last + 1)
        resumed.expect_nothing(0.5)
    finally:
        resumed.close()


def test_watch_one_key_with_initial_state(driver: Driver, prefix: str) -> None:
    driver.put(prefix + "cfg", "v1")
    driver.put(prefix + "cfg-other", "x")
    watch = driver.watch(prefix + "cfg", include_initial_state=True)
    try:
        initial = watch.next()
        assert initial.initial
        assert (initial.key, initial.entry.value) == (prefix + "cfg", b"v1")
        driver.put(prefix + "cfg-other", "y")
        changed = driver.put(prefix + "cfg", "v2")
        event = watch.next()
        assert (event.key, event.entry.value, event.revision) == (prefix + "cfg", b"v2", changed.revision)
        assert not event.initial
    finally:
        watch.close()


def test_status(driver: Driver, prefix: str) -> None:
    put = driver.put(prefix + "x", "1")
    status = driver.status()
    assert status.revision >= put.revision
    assert status.store == "sqlite"
    assert status.key_count >= 1
    assert status.limits.max_page_size >= status.limits.default_page_size > 0
    assert status.limits.max_key_bytes > 0
    assert status.server_version


# --------------------------------------------------------------------------- restart


def _write_exactly_once(client: Client, key: str, value: str, deadline: float) -> None:
    """Create `key` once even across a restart: if_absent makes a repeated attempt harmless."""
    while True:
        try:
            client.put(key, value, if_absent=True, timeout=2.0)
            return
        except Conflict:
            assert client.get(key, timeout=5.0).value == value.encode()  # an earlier try landed
            return
        except (kvclient.Unavailable, kvclient.DeadlineExceeded, kvclient.Cancelled):
            # The outcome is unknown (kv-server answers CANCELLED to writes in flight when it
            # stops): try again; if_absent makes a landed attempt show up as a Conflict.
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def _watch_through_an_outage(driver: Driver, kv_server: ServerProcess, prefix: str, how: str) -> None:
    """Write 120 keys, stop the server in the middle ("restart": SIGTERM, or "kill": SIGKILL,
    then start it again on the same port and file) and check that the watch delivered every write
    exactly once, in order, with the revisions the store has."""
    total, restart_at = 120, 40
    with Client(kv_server.address) as writer:
        start = writer.status().revision + 1
        watch = driver.watch(prefix, prefix=True, start_revision=start)
        try:
            keys = [f"{prefix}{i:04d}" for i in range(total)]
            failure: list[BaseException] = []
            restarted = threading.Event()

            def write() -> None:
                try:
                    deadline = time.monotonic() + 60
                    for i, key in enumerate(keys):
                        if i == restart_at:
                            restarted.wait(60)
                        _write_exactly_once(writer, key, str(i), deadline)
                        if i >= restart_at:
                            time.sleep(0.002)
                except BaseException as error:
                    failure.append(error)

            thread = threading.Thread(target=write, daemon=True)
            thread.start()
            events = [watch.next() for _ in range(restart_at // 2)]  # the stream is flowing
            if how == "restart":
                # Writes go on while the server stops (SIGTERM) and starts again.
                stopper = threading.Thread(target=kv_server.restart)
                stopper.start()
                restarted.set()
                stopper.join(60)
            else:
                kv_server.kill()
                restarted.set()
                time.sleep(0.3)
                kv_server.start()
            waited = 0.0
            while len(events) < total:
                assert not failure, failure  # the writer died: say why, not "no event"
                try:
                    events.append(watch.next(timeout=0.5))
                    waited = 0.0
                except AssertionError:
                    waited += 0.5
                    assert waited < 40, f"no watch event for 40 s after {len(events)} events"
            thread.join(60)
            assert not failure, failure
            watch.expect_nothing(1.0)  # and nothing more: no event twice
        finally:
            watch.close()

        assert [e.key for e in events] == keys
        assert [e.entry.value for e in events] == [str(i).encode() for i in range(total)]
        assert all(e.type is EventType.PUT and e.entry.version == 1 for e in events)
        revisions = [e.revision for e in events]
        assert revisions == sorted(set(revisions))
        assert revisions[0] >= start
        stored = {e.key: e.mod_revision for e in writer.list(prefix)}
        assert stored == {e.key: e.revision for e in events}


@pytest.mark.slow
def test_watch_survives_a_server_restart_mid_stream_exactly_once(
    driver: Driver, kv_server: ServerProcess, prefix: str
) -> None:
    _watch_through_an_outage(driver, kv_server, prefix, "restart")


@pytest.mark.slow
def test_watch_survives_a_server_kill_mid_stream_exactly_once(kv_server: ServerProcess, prefix: str) -> None:
    driver = SyncDriver(kv_server.address)
    try:
        _watch_through_an_outage(driver, kv_server, prefix, "kill")
    finally:
        driver.close()
