"""Fault injection: the clients against a scripted in-process gRPC server.

A real server cannot be made to fail on cue; this one can. It answers with the failures a test
scripts (UNAVAILABLE twice, a watch cancelled for shutdown, compacted history, a slow answer) and
records what the client sent (requests, attempts, metadata), to check the retry rule, the watch's
resume logic, timeouts, the bearer token and TLS through the real gRPC stack.
"""

from __future__ import annotations

import asyncio
import collections
import subprocess
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest

import kvclient
from kv.v1 import kv_pb2, kv_pb2_grpc

FAST = kvclient.RetryPolicy(initial_backoff=0.01, max_backoff=0.05, watch_resume_timeout=2.0)


@dataclass
class WatchSession:
    """What one Watch call answers: messages, then an abort code (or keep the stream open)."""

    messages: list[kv_pb2.WatchResponse]
    end: grpc.StatusCode | None = grpc.StatusCode.UNAVAILABLE
    end_message: str = "connection dropped"


@dataclass
class Script:
    failures: dict[str, list[tuple[grpc.StatusCode, str]]] = field(default_factory=dict)
    delay: dict[str, float] = field(default_factory=dict)
    watch_sessions: list[WatchSession] = field(default_factory=list)
    revision: int = 40
    calls: collections.Counter[str] = field(default_factory=collections.Counter)
    requests: dict[str, list[Any]] = field(default_factory=lambda: collections.defaultdict(list))
    metadata: list[dict[str, str]] = field(default_factory=list)


class ScriptedServicer(kv_pb2_grpc.KeyValueServicer):
    def __init__(self, script: Script) -> None:
        self.script = script

    async def _enter(self, name: str, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        script = self.script
        script.calls[name] += 1
        script.requests[name].append(request)
        script.metadata.append({k: v for k, v in context.invocation_metadata() or () if isinstance(v, str)})
        if script.delay.get(name):
            await asyncio.sleep(script.delay[name])
        failures = script.failures.get(name)
        if failures:
            code, message = failures.pop(0)
            await context.abort(code, message)

    def _header(self) -> kv_pb2.ResponseHeader:
        return kv_pb2.ResponseHeader(revision=self.script.revision)

    async def Get(self, request: kv_pb2.GetRequest, context: Any) -> kv_pb2.GetResponse:
        await self._enter("Get", request, context)
        entry = kv_pb2.Entry(key=request.key, value="v", create_revision=1, mod_revision=2, version=2)
        return kv_pb2.GetResponse(header=self._header(), entry=entry)

    async def GetValue(self, request: kv_pb2.GetValueRequest, context: Any) -> Any:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "not scripted")

    async def PutValue(self, request: kv_pb2.PutValueRequest, context: Any) -> kv_pb2.PutValueResponse:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "not scripted")
        raise AssertionError  # unreachable: abort raises

    async def BatchPut(self, request: kv_pb2.BatchPutRequest, context: Any) -> kv_pb2.BatchPutResponse:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "not scripted")
        raise AssertionError  # unreachable: abort raises

    async def Put(self, request: kv_pb2.PutRequest, context: Any) -> kv_pb2.PutResponse:
        await self._enter("Put", request, context)
        self.script.revision += 1
        entry = kv_pb2.Entry(key=request.key, create_revision=1, mod_revision=self.script.revision, version=1)
        return kv_pb2.PutResponse(header=self._header(), created=True, entry=entry)

    async def Delete(self, request: kv_pb2.DeleteRequest, context: Any) -> kv_pb2.DeleteResponse:
        await self._enter("Delete", request, context)
        return kv_pb2.DeleteResponse(header=self._header(), deleted=1)

    async def List(self, request: kv_pb2.ListRequest, context: Any) -> kv_pb2.ListResponse:
        await self._enter("List", request, context)
        page = int(request.page_token or "0")
        response = kv_pb2.ListResponse(header=self._header())
        response.entries.append(kv_pb2.Entry(key=f"k{page}", value="v", mod_revision=1, version=1))
        if page < 2:
            response.next_page_token = str(page + 1)
        return response

    async def Status(self, request: kv_pb2.StatusRequest, context: Any) -> kv_pb2.StatusResponse:
        await self._enter("Status", request, context)
        return kv_pb2.StatusResponse(header=self._header(), store="scripted")

    async def Watch(self, request: kv_pb2.WatchRequest, context: Any) -> AsyncIterator[kv_pb2.WatchResponse]:
        await self._enter("Watch", request, context)
        if not self.script.watch_sessions:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "no more sessions")
        session = self.script.watch_sessions.pop(0)
        for message in session.messages:
            yield message
        if session.end is None:
            await asyncio.sleep(3600)
        await context.abort(session.end, session.end_message)


class ScriptedServer:
    """A grpc.aio server on its own event loop thread, so blocking clients can call it too."""

    def __init__(self, credentials: grpc.ServerCredentials | None = None) -> None:
        self.script = Script()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.port = asyncio.run_coroutine_threadsafe(self._start(credentials), self.loop).result(10)

    async def _start(self, credentials: grpc.ServerCredentials | None) -> int:
        self.server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        kv_pb2_grpc.add_KeyValueServicer_to_server(ScriptedServicer(self.script), self.server)
        if credentials is None:
            port = self.server.add_insecure_port("127.0.0.1:0")
        else:
            port = self.server.add_secure_port("127.0.0.1:0", credentials)
        await self.server.start()
        return port

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.server.stop(0), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture
def scripted() -> Iterator[ScriptedServer]:
    server = ScriptedServer()
    try:
        yield server
    finally:
        server.stop()


def unavailable(times: int) -> list[tuple[grpc.StatusCode, str]]:
    return [(grpc.StatusCode.UNAVAILABLE, "storage is restarting")] * times


def events(header: int, *revisions: int, key: str = "app/k") -> kv_pb2.WatchResponse:
    return kv_pb2.WatchResponse(
        header=kv_pb2.ResponseHeader(revision=header),
        events=[
            kv_pb2.Event(
                type=kv_pb2.Event.TYPE_PUT,
                entry=kv_pb2.Entry(key=key, value=f"v{r}", create_revision=1, mod_revision=r, version=r),
            )
            for r in revisions
        ],
    )


def cancel(reason: int, *, resume: int = 0, compact: int = 0, header: int = 0) -> kv_pb2.WatchResponse:
    return kv_pb2.WatchResponse(
        header=kv_pb2.ResponseHeader(revision=header),
        cancel=kv_pb2.WatchCancel(
            reason=reason,  # type: ignore[arg-type]
            resume_revision=resume,
            compact_revision=compact,
            message=f"cancelled: reason {reason}",
        ),
    )


# --------------------------------------------------------------------------- the retry rule


def test_reads_are_retried_on_unavailable(scripted: ScriptedServer) -> None:
    scripted.script.failures = {"Get": unavailable(2), "List": unavailable(1), "Status": unavailable(1)}
    with kvclient.Client(scripted.address, retry=FAST) as client:
        assert client.get("k").text == "v"
        assert client.list().keys() == ["k0", "k1", "k2"]
        assert client.status().store == "scripted"
    assert scripted.script.calls["Get"] == 3
    assert scripted.script.calls["List"] == 4
    assert [r.page_token for r in scripted.script.requests["List"]] == ["", "", "1", "2"]


def test_unconditional_writes_are_never_retried(scripted: ScriptedServer) -> None:
    scripted.script.failures = {"Put": unavailable(1), "Delete": unavailable(1)}
    with kvclient.Client(scripted.address, retry=FAST) as client:
        with pytest.raises(kvclient.Unavailable, match="storage is restarting"):
            client.put("k", "v", if_absent=True)
        with pytest.raises(kvclient.Unavailable):
            client.delete("k", allow_missing=True)
    assert scripted.script.calls["Put"] == 1
    assert scripted.script.calls["Delete"] == 1


def test_writes_conditional_on_a_revision_are_retried(scripted: ScriptedServer) -> None:
    scripted.script.failures = {"Put": unavailable(2), "Delete": unavailable(1)}
    with kvclient.Client(scripted.address, retry=FAST) as client:
        assert client.put("k", "v", if_mod_revision=3).revision == 41
        assert client.delete("k", if_version=1).deleted == 1
    assert scripted.script.calls["Put"] == 3
    assert scripted.script.calls["Delete"] == 2


def test_retries_stop_after_max_attempts(scripted: ScriptedServer) -> None:
    scripted.script.failures = {"Get": unavailable(100)}
    policy = kvclient.RetryPolicy(max_attempts=4, initial_backoff=0.01, max_backoff=0.02)
    with kvclient.Client(scripted.address, retry=policy) as client, pytest.raises(kvclient.Unavailable):
        client.get("k")
    assert scripted.script.calls["Get"] == 4


def test_other_errors_are_not_retried_and_keep_the_servers_message(scripted: ScriptedServer) -> None:
    scripted.script.failures = {"Get": [(grpc.StatusCode.PERMISSION_DENIED, "no access to key 'k'")]}
    with (
        kvclient.Client(scripted.address, retry=FAST) as client,
        pytest.raises(kvclient.PermissionDenied) as info,
    ):
        client.get("k")
    assert str(info.value) == "no access to key 'k'"
    assert info.value.code == grpc.StatusCode.PERMISSION_DENIED
    assert scripted.script.calls["Get"] == 1


async def test_async_client_follows_the_same_rule(scripted: ScriptedServer) -> None:
    scripted.script.failures = {"Get": unavailable(2), "Put": unavailable(2)}
    async with kvclient.AsyncClient(scripted.address, retry=FAST) as client:
        assert (await client.get("k")).text == "v"
        with pytest.raises(kvclient.Unavailable):
            await client.put("k", "v")
        assert (await client.put("k", "v", if_version=1)).created
    assert scripted.script.calls["Get"] == 3
    assert scripted.script.calls["Put"] == 3


# --------------------------------------------------------------------------- timeouts and metadata


def test_calls_time_out_by_default_and_per_call(scripted: ScriptedServer) -> None:
    scripted.script.delay = {"Get": 2.0}
    with kvclient.Client(scripted.address, timeout=0.2) as client:
        started = time.monotonic()
        with pytest.raises(kvclient.DeadlineExceeded):
            client.get("k")
        with pytest.raises(kvclient.DeadlineExceeded):
            client.get("k", timeout=0.1)
        assert time.monotonic() - started < 1.5
        assert client.get("k", timeout=5).text == "v"


async def test_async_calls_time_out(scripted: ScriptedServer) -> None:
    scripted.script.delay = {"Get": 2.0}
    async with kvclient.AsyncClient(scripted.address) as client:
        with pytest.raises(kvclient.DeadlineExceeded):
            await client.get("k", timeout=0.2)


def test_the_bearer_token_is_sent_with_every_call(scripted: ScriptedServer) -> None:
    with kvclient.Client(scripted.address, token="s3cret") as client:
        client.get("k")
        client.put("k", "v")
    assert [m.get("authorization") for m in scripted.script.metadata] == ["Bearer s3cret"] * 2
    assert all(m.get("user-agent", "").startswith("kv-client-python/") for m in scripted.script.metadata)


async def test_the_async_client_sends_the_token_too(scripted: ScriptedServer) -> None:
    async with kvclient.AsyncClient(scripted.address, token="t0k") as client:
        await client.status()
    assert scripted.script.metadata[0]["authorization"] == "Bearer t0k"


# --------------------------------------------------------------------------- watch


SHUTDOWN = kv_pb2.WatchCancel.REASON_SHUTDOWN
SLOW = kv_pb2.WatchCancel.REASON_SLOW_CONSUMER
COMPACTED = kv_pb2.WatchCancel.REASON_COMPACTED


def collect(watch: kvclient.Watch[kvclient.WatchEvent], count: int) -> list[int]:
    revisions = []
    for event in watch:
        revisions.append(event.revision)
        if len(revisions) == count:
            break
    return revisions


def test_watch_resumes_after_a_dropped_connection_without_repeats(scripted: ScriptedServer) -> None:
    scripted.script.watch_sessions = [
        WatchSession([events(6, 5, 6)]),  # then the connection drops (UNAVAILABLE)
        WatchSession([events(8, 6, 7, 8)], end=None),  # a server repeating 6: dropped
    ]
    client = kvclient.Client(scripted.address, retry=FAST)
    with client, client.watch("app/", prefix=True, start_revision=5) as watch:
        assert collect(watch, 4) == [5, 6, 7, 8]
        assert watch.revision == 8
    starts = [r.start_revision for r in scripted.script.requests["Watch"]]
    assert starts == [5, 7]


@pytest.mark.parametrize("reason", [SHUTDOWN, SLOW])
def test_watch_resumes_from_resume_revision_after_a_cancel(scripted: ScriptedServer, reason: int) -> None:
    scripted.script.watch_sessions = [
        WatchSession(
            [events(10, 9, 10), cancel(reason, resume=11, header=10)],
            end=grpc.StatusCode.UNAVAILABLE if reason == SHUTDOWN else grpc.StatusCode.RESOURCE_EXHAUSTED,
        ),
        WatchSession([events(11, 11)], end=None),
    ]
    client = kvclient.Client(scripted.address, retry=FAST)
    with client, client.watch("app/", prefix=True, start_revision=9) as watch:
        assert collect(watch, 3) == [9, 10, 11]
    assert [r.start_revision for r in scripted.script.requests["Watch"]] == [9, 11]


def test_watch_raises_history_compacted_with_the_compact_revision(scripted: ScriptedServer) -> None:
    scripted.script.watch_sessions = [
        WatchSession([cancel(COMPACTED, compact=30, header=50)], end=grpc.StatusCode.OUT_OF_RANGE),
    ]
    with kvclient.Client(scripted.address, retry=FAST) as client:
        watch = client.watch("app/", prefix=True, start_revision=3)
        with pytest.raises(kvclient.HistoryCompacted) as info:
            next(watch)
        assert info.value.compact_revision == 30
        assert watch.closed
    scripted.script.watch_sessions = [
        WatchSession([], end=grpc.StatusCode.OUT_OF_RANGE, end_message="too old")
    ]
    client = kvclient.Client(scripted.address, retry=FAST)
    with client, pytest.raises(kvclient.HistoryCompacted, match="too old"):
        next(client.watch("app/", prefix=True, start_revision=3))


def test_watch_gives_up_after_the_resume_timeout(scripted: ScriptedServer) -> None:
    scripted.script.watch_sessions = [WatchSession([events(5, 5)])]  # then UNAVAILABLE forever
    policy = kvclient.RetryPolicy(initial_backoff=0.01, max_backoff=0.05, watch_resume_timeout=0.5)
    with kvclient.Client(scripted.address, retry=policy) as client:
        watch = client.watch("app/", prefix=True, start_revision=5)
        assert next(watch).revision == 5
        started = time.monotonic()
        with pytest.raises(kvclient.Unavailable):
            next(watch)
        assert 0.4 < time.monotonic() - started < 3.0
    assert scripted.script.calls["Watch"] > 3


def test_watch_from_now_starts_after_the_current_revision(scripted: ScriptedServer) -> None:
    scripted.script.revision = 41
    scripted.script.watch_sessions = [WatchSession([events(42, 42)], end=None)]
    with kvclient.Client(scripted.address, retry=FAST) as client, client.watch("app/k") as watch:
        assert collect(watch, 1) == [42]
    request = scripted.script.requests["Watch"][0]
    assert (request.key, request.prefix, request.start_revision) == ("app/k", False, 42)


def test_watch_fails_at_once_when_the_server_cannot_be_reached() -> None:
    with kvclient.Client("127.0.0.1:9", retry=FAST, timeout=2) as client:
        started = time.monotonic()
        with pytest.raises(kvclient.Unavailable):
            next(client.watch("k"))
        assert time.monotonic() - started < 2.5


def test_watch_progress_items_and_the_revision_attribute(scripted: ScriptedServer) -> None:
    progress = kv_pb2.WatchResponse(header=kv_pb2.ResponseHeader(revision=60))
    scripted.script.watch_sessions = [WatchSession([progress, events(61, 61)], end=None)]
    with (
        kvclient.Client(scripted.address, retry=FAST) as client,
        client.watch("app/", prefix=True, start_revision=50, progress=True, progress_interval=0.5) as watch,
    ):
        first = next(watch)
        assert first == kvclient.WatchProgress(60)
        assert watch.revision == 60
        second = next(watch)
        assert isinstance(second, kvclient.WatchEvent)
        assert second.revision == 61
    assert scripted.script.requests["Watch"][0].progress_interval_ms == 500


def test_a_broken_initial_state_is_fetched_again_and_delivered_once(scripted: ScriptedServer) -> None:
    head = kv_pb2.ResponseHeader(revision=7)
    a, b = (
        kv_pb2.Entry(key="app/a", value="1", mod_revision=3),
        kv_pb2.Entry(key="app/b", value="2", mod_revision=7),
    )
    scripted.script.watch_sessions = [
        WatchSession([kv_pb2.WatchResponse(header=head, initial_entries=[a])]),  # broken here
        WatchSession(
            [
                kv_pb2.WatchResponse(header=head, initial_entries=[a]),
                kv_pb2.WatchResponse(header=head, initial_entries=[b], initial_state_complete=True),
                events(8, 8, key="app/a"),
            ],
            end=None,
        ),
    ]
    client = kvclient.Client(scripted.address, retry=FAST)
    with client, client.watch("app/", prefix=True, include_initial_state=True) as watch:
        seen = [(e.key, e.initial, e.revision) for _, e in zip(range(3), watch, strict=False)]
    assert seen == [("app/a", True, 3), ("app/b", True, 7), ("app/a", False, 8)]
    requests = scripted.script.requests["Watch"]
    assert [r.include_initial_state for r in requests] == [True, True]


def test_closing_a_watch_from_another_thread_ends_the_iteration(scripted: ScriptedServer) -> None:
    scripted.script.watch_sessions = [WatchSession([], end=None)]
    with kvclient.Client(scripted.address, retry=FAST) as client:
        watch = client.watch("app/", prefix=True, start_revision=1)
        threading.Timer(0.3, watch.close).start()
        started = time.monotonic()
        assert list(watch) == []
        assert time.monotonic() - started < 5


async def test_async_watch_resumes_after_a_cancel(scripted: ScriptedServer) -> None:
    scripted.script.watch_sessions = [
        WatchSession([events(10, 9, 10), cancel(SHUTDOWN, resume=11, header=10)]),
        WatchSession([events(12, 10, 11, 12)], end=None),
    ]
    async with kvclient.AsyncClient(scripted.address, retry=FAST) as client:
        revisions = []
        async with client.watch("app/", prefix=True, start_revision=9) as watch:
            async for event in watch:
                revisions.append(event.revision)
                if len(revisions) == 4:
                    break
        assert watch.closed
    assert revisions == [9, 10, 11, 12]
    assert [r.start_revision for r in scripted.script.requests["Watch"]] == [9, 11]


async def test_async_watch_ends_when_closed_and_the_client_closes_its_watches(
    scripted: ScriptedServer,
) -> None:
    scripted.script.watch_sessions = [WatchSession([], end=None)]
    client = kvclient.AsyncClient(scripted.address, retry=FAST)
    watch = client.watch("app/", prefix=True, start_revision=1)

    async def consume() -> list[kvclient.WatchEvent]:
        return [event async for event in watch]

    task = asyncio.create_task(consume())
    await asyncio.sleep(0.3)
    await client.close()
    assert await asyncio.wait_for(task, 5) == []
    assert watch.closed


async def test_cancelling_the_consuming_task_cancels_the_watch(scripted: ScriptedServer) -> None:
    scripted.script.watch_sessions = [WatchSession([], end=None)]
    async with kvclient.AsyncClient(scripted.address, retry=FAST) as client:
        watch = client.watch("app/", prefix=True, start_revision=1)
        task = asyncio.create_task(anext(watch))
        await asyncio.sleep(0.3)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert watch.closed


# --------------------------------------------------------------------------- TLS


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=30)  # noqa: S603


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """A CA, a server certificate for kv.test and a client certificate, made with openssl."""
    d = tmp_path_factory.mktemp("pki")
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=kv test CA",
             "-keyout", "ca.key", "-out", "ca.pem", cwd=d)  # fmt: skip
    (d / "san.ext").write_text("subjectAltName=DNS:kv.test\n")
    for name, cn in (("server", "kv.test"), ("client", "kv client")):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={cn}",
                 "-keyout", f"{name}.key", "-out", f"{name}.csr", cwd=d)  # fmt: skip
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                 "-days", "2", "-extfile", "san.ext", "-out", f"{name}.pem", cwd=d)  # fmt: skip
    return {p.name: p.read_bytes() for p in d.iterdir() if p.suffix in (".pem", ".key")}


def test_tls_and_mutual_tls(pki: dict[str, bytes]) -> None:
    credentials = grpc.ssl_server_credentials(
        [(pki["server.key"], pki["server.pem"])], root_certificates=pki["ca.pem"], require_client_auth=True
    )
    server = ScriptedServer(credentials)
    try:
        tls = kvclient.Tls(pki["ca.pem"], pki["client.pem"], pki["client.key"], server_name="kv.test")
        with kvclient.Client(server.address, tls=tls, token="tok") as client:
            assert client.get("k").text == "v"
        assert server.script.metadata[-1]["authorization"] == "Bearer tok"
        no_client_cert = kvclient.Tls(pki["ca.pem"], server_name="kv.test")
        client = kvclient.Client(server.address, tls=no_client_cert, retry=FAST, timeout=3)
        with client, pytest.raises(kvclient.Unavailable):
            client.get("k")
    finally:
        server.stop()


async def test_async_client_over_mutual_tls(pki: dict[str, bytes], tmp_path: Path) -> None:
    credentials = grpc.ssl_server_credentials(
        [(pki["server.key"], pki["server.pem"])], root_certificates=pki["ca.pem"], require_client_auth=True
    )
    server = ScriptedServer(credentials)
    try:
        for name in ("ca.pem", "client.pem", "client.key"):
            (tmp_path / name).write_bytes(pki[name])
        tls = kvclient.Tls.from_files(
            tmp_path / "ca.pem", tmp_path / "client.pem", tmp_path / "client.key", server_name="kv.test"
        )
        async with kvclient.AsyncClient(server.address, tls=tls) as client:
            assert (await client.status()).store == "scripted"
    finally:
        server.stop()
