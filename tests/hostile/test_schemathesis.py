"""Schemathesis against the published REST API: cases generated from docs/openapi/kv.openapi.json,
sent through the real Envoy gateway to the real kv-server (tests/e2e/conftest.py starts both).

Every operation of the document gets positive cases (data the document allows), negative cases
(data it forbids) where the document makes those possible, and, for the operations that name a
key, positive cases aimed at keys that exist (the "pool"), so reads, conditional writes and
deletes meet real entries. Every answer must pass schemathesis' checks: no 5xx
(`not_a_server_error`), a documented status, content type and headers, and a body the documented
schema accepts (`response_schema_conformance`). The two Watch operations stream for as long as the
client stays: their answer is read up to its first line, or for WATCH_WINDOW_S, and that is what
is checked.

Afterwards both processes must be up and healthy, and what the requests changed is accounted for
exactly, as in test_fuzz_requests.py: the history since the first case is replayed with a gRPC
Watch, every revision is one event, and every event comes from a request that got a 2xx (its
PUTs, the number of keys its DELETEs reported, EXPIREs of keys written with a TTL) or from the
test's own gRPC rewrites of the pool keys; every entry listed afterwards is either as it was
before the run or written by such an event; and sentinel keys, under a prefix the generated
requests are kept from writing or deleting, are unchanged.
"""

from __future__ import annotations

import json
import sys
import time
import urllib.parse
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeAlias

import grpc
import pytest
import requests
import schemathesis
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, Phase, Verbosity, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis import Case, GenerationMode
from schemathesis.checks import CheckFunction, not_a_server_error
from schemathesis.core.failures import FailureGroup
from schemathesis.core.result import Ok
from schemathesis.core.transport import Response
from schemathesis.schemas import APIOperation
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from kv.v1 import kv_pb2, kv_pb2_grpc

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # for tests.e2e.conftest: the same gateway the e2e tests use

from tests.e2e.conftest import Gateway, running_gateway  # noqa: E402

DOCUMENT = ROOT / "docs" / "openapi" / "kv.openapi.json"

Operation: TypeAlias = "APIOperation[Any, Any, Any, Any]"
AnyCase: TypeAlias = "Case[Any]"

# Examples per operation and kind of case. Operations without parameters have one possible case,
# and negative cases only exist where the document forbids something; MIN_CASES is the floor.
POSITIVE_EXAMPLES = 20
NEGATIVE_EXAMPLES = 10
POOL_EXAMPLES_PER_KEY = 2
MIN_CASES = 500

REQUEST_TIMEOUT_S = 10.0
GRPC_TIMEOUT_S = 10.0
# How long an accepted Watch is read for its first line (the status and headers come at once).
WATCH_WINDOW_S = 0.2

CHECKS: list[CheckFunction] = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]
# An accepted Watch that sent no line within the window has no body to check yet.
CHECKS_WITHOUT_BODY: list[CheckFunction] = [not_a_server_error, status_code_conformance]

SENTINEL_PREFIX = "~sentinel/"
SENTINELS = {f"{SENTINEL_PREFIX}{index}": f"sentinel value {index}".encode() for index in range(5)}

# Existing keys the pool cases address, with their value and content type; rewritten before each
# operation's pool cases (DELETEs remove them, PUTs change them).
POOL = {
    "pool/text": (b"hello", "text/plain"),
    "pool/json": (b'{"a": "b"}', "application/json"),
    "pool/binary": (b"\x89PNG\r\n\x1a\n\x00", "image/png"),
    "pool/empty": (b"", ""),
    "pool/dir/": (b"trailing slash", ""),
    "pool/a b?c+%#\u00fc": (b"odd characters", "text/plain; charset=utf-8"),
}

# What each mutating route's 2xx answer says it changed.
V1_PUTS = {"PUT /v1/kv/{key}", "PUT /v1/raw/{key}", "PUT /keys/{key}"}  # {"entry": {"key", "expire_time"}}
COMPAT_PUTS = {"PUT /kv/{key}", "POST /set", "POST /put"}  # {"key"}
V1_DELETE = "DELETE /v1/kv/{key}"  # {"deleted": "<count>"}
COMPAT_DELETES = {"DELETE /kv/{key}", "DELETE /keys/{key}", "DELETE /delete"}  # {"key", "deleted": bool}
MUTATING = V1_PUTS | COMPAT_PUTS | {V1_DELETE} | COMPAT_DELETES
WATCHES = {"GET /v1/watch", "POST /v1/watch"}
# Operations that take the key in the query, not in the path.
QUERY_KEY = {"GET /get", "GET /local_read", "DELETE /delete", "GET /v1/watch"}


@dataclass
class Ledger:
    """What the run sent, what was accepted, and what went wrong."""

    cases: Counter[str] = field(default_factory=Counter)
    statuses: Counter[int] = field(default_factory=Counter)
    skipped: int = 0
    puts: Counter[str] = field(default_factory=Counter)
    deleted: int = 0
    deleted_keys: Counter[str] = field(default_factory=Counter)
    ttl_keys: set[str] = field(default_factory=set)
    failures: dict[tuple[str, str], list[str]] = field(default_factory=dict)
    unsatisfiable: list[str] = field(default_factory=list)
    silent_watches: int = 0  # accepted Watches that sent no line within WATCH_WINDOW_S

    @property
    def total(self) -> int:
        return sum(self.cases.values())

    def fail(self, label: str, kind: str, report: str) -> None:
        self.failures.setdefault((label, kind), []).append(report)

    def account(self, label: str, response: Response) -> None:
        """Record what a 2xx answer of a mutating route says it changed."""
        if label not in MUTATING or not 200 <= response.status_code < 300:
            return
        try:
            body = json.loads(response.content)
            if label in V1_PUTS:
                self.puts[body["entry"]["key"]] += 1
                if body["entry"].get("expire_time"):
                    self.ttl_keys.add(body["entry"]["key"])
            elif label in COMPAT_PUTS:
                self.puts[body["key"]] += 1
            elif label == V1_DELETE:
                self.deleted += int(body["deleted"])
            elif body["deleted"]:
                self.deleted += 1
                self.deleted_keys[body["key"]] += 1
        except (ValueError, KeyError, TypeError) as error:
            self.fail(label, "an accepted write whose answer does not say what it changed", repr(error))


def operations(schema: schemathesis.BaseSchema) -> list[Operation]:
    found: list[Operation] = []
    for result in schema.get_all_operations():
        assert isinstance(result, Ok), result
        found.append(result.ok())
    return sorted(found, key=lambda operation: operation.label)


def wire_request(case: AnyCase, base_url: str) -> tuple[dict[str, Any], requests.PreparedRequest]:
    """The arguments schemathesis sends the case with, and the URL they make (as requests prepares
    it: percent-encoded once, dot segments removed)."""
    data = case.as_transport_kwargs(base_url=base_url)
    prepared = requests.Request(method=data["method"], url=data["url"], params=data.get("params")).prepare()
    return data, prepared


def addressed_keys(case: AnyCase, prepared: requests.PreparedRequest) -> list[str]:
    """The keys a request names, as kv-server will see them (the path once decoded, as Envoy does)."""
    label = case.operation.label
    keys: list[str] = []
    path = urllib.parse.urlsplit(prepared.url or "").path
    template = case.operation.path
    if "{key}" in template:
        route = template.removesuffix("{key}")
        keys.append(urllib.parse.unquote(path.removeprefix(route)) if path.startswith(route) else "")
    query = case.query if isinstance(case.query, dict) else {}
    in_query = query.get("key")
    if label in QUERY_KEY and isinstance(in_query, str):
        keys.append(in_query)
    body = case.body if isinstance(case.body, dict) else {}
    in_body = body.get("key")
    if isinstance(in_body, str):
        keys.append(in_body)
    return keys


def aims_at_sentinels(case: AnyCase, prepared: requests.PreparedRequest) -> bool:
    """Whether a write or delete could change a sentinel key (such cases are not sent)."""
    label = case.operation.label
    if label not in MUTATING:
        return False
    keys = addressed_keys(case, prepared)
    query = case.query if isinstance(case.query, dict) else {}
    if label == V1_DELETE and str(query.get("prefix", "false")).lower() not in ("false", "0", ""):
        candidates = {variant for key in keys for variant in (key, key.rstrip("/"), key.strip("/."))}
        return any(sentinel.startswith(key) for key in candidates for sentinel in SENTINELS)
    return any(key.startswith(SENTINEL_PREFIX) or key.startswith("/" + SENTINEL_PREFIX) for key in keys)


def call_watch(case: AnyCase, base_url: str, session: requests.Session) -> tuple[Response, bool]:
    """Send a Watch case and read its answer up to the first line; (response, whether a line came)."""
    data, _ = wire_request(case, base_url)
    started = time.monotonic()
    with session.request(**data, stream=True, timeout=(REQUEST_TIMEOUT_S, WATCH_WINDOW_S)) as answer:
        if answer.status_code != 200:
            content = answer.content  # an error answer ends
            complete = True
        else:
            content = b""
            deadline = time.monotonic() + WATCH_WINDOW_S
            try:
                # With stream=True and no chunk size, chunks are yielded as they arrive.
                for chunk in answer.iter_content(chunk_size=None):
                    content += chunk
                    if b"\n" in content or time.monotonic() > deadline:
                        break
            except requests.exceptions.ConnectionError:
                pass  # the read timeout: no line within the window
            complete = b"\n" in content
            content = content.split(b"\n", 1)[0]
        headers = {name: answer.raw.headers.getlist(name) for name in answer.raw.headers}
        response = Response(
            status_code=answer.status_code,
            headers=headers,
            content=content,
            request=answer.request,
            elapsed=time.monotonic() - started,
            verify=True,
            message=answer.reason,
        )
    return response, complete


class Runner:
    """Sends generated cases to the gateway, checks every answer and keeps the ledger."""

    def __init__(self, gateway: Gateway, base_url: str, session: requests.Session, ledger: Ledger) -> None:
        self.gateway = gateway
        self.base_url = base_url
        self.session = session
        self.ledger = ledger

    def run(self, schema: schemathesis.BaseSchema) -> None:
        for operation in operations(schema):
            self.cases(
                operation, "positive", operation.as_strategy(GenerationMode.POSITIVE), POSITIVE_EXAMPLES
            )
            self.cases(
                operation, "negative", operation.as_strategy(GenerationMode.NEGATIVE), NEGATIVE_EXAMPLES
            )
            if "{key}" in operation.path or operation.label in QUERY_KEY:
                write_pool(self.gateway, self.ledger)
                for key in POOL:
                    self.cases(operation, "pool", pool_cases(operation, key), POOL_EXAMPLES_PER_KEY)

    def cases(
        self, operation: Operation, kind: str, strategy: st.SearchStrategy[AnyCase], examples: int
    ) -> None:
        sent_before = self.ledger.cases[f"{operation.label} [{kind}]"]

        @settings(
            max_examples=examples,
            deadline=None,
            database=None,
            phases=[Phase.generate],
            suppress_health_check=list(HealthCheck),
            verbosity=Verbosity.quiet,  # no "@seed" lines for the operations without negative cases
        )
        @given(case=strategy)
        def generated(case: AnyCase) -> None:
            self.one(case, kind)

        try:
            generated()
        except Unsatisfiable:
            # The document forbids nothing this operation could be sent (no parameters, or a path
            # key and a raw body, which accept anything): there is no negative case to make.
            assert kind == "negative", (operation.label, kind)
            assert self.ledger.cases[f"{operation.label} [{kind}]"] == sent_before
            self.ledger.unsatisfiable.append(operation.label)

    def one(self, case: AnyCase, kind: str) -> None:
        label = case.operation.label
        _, prepared = wire_request(case, self.base_url)
        if aims_at_sentinels(case, prepared):
            self.ledger.skipped += 1
            return
        self.ledger.cases[f"{label} [{kind}]"] += 1
        checks = CHECKS
        try:
            if label in WATCHES:
                response, complete = call_watch(case, self.base_url, self.session)
                if not complete:
                    checks = CHECKS_WITHOUT_BODY
                    self.ledger.silent_watches += 1
            else:
                response = case.call(base_url=self.base_url, session=self.session, timeout=REQUEST_TIMEOUT_S)
        except requests.exceptions.RequestException as error:
            self.ledger.fail(label, "no answer", f"{type(error).__name__}: {error}\n{case.as_curl_command()}")
            return
        self.ledger.statuses[response.status_code] += 1
        self.ledger.account(label, response)
        try:
            case.validate_response(response, checks=checks)
        except FailureGroup as group:
            for failure in group.exceptions:
                self.ledger.fail(label, f"{failure.code} {failure.title}", str(group))


def pool_cases(operation: Operation, key: str) -> st.SearchStrategy[AnyCase]:
    """Positive cases of an operation that names a key, with the key one of the pool's."""
    if operation.label in QUERY_KEY:
        return operation.as_strategy(GenerationMode.POSITIVE, query={"key": key})
    return operation.as_strategy(GenerationMode.POSITIVE, path_parameters={"key": key})


def write_pool(gateway: Gateway, ledger: Ledger | None) -> None:
    """(Re)write the pool keys over gRPC; after the run has started, they are accepted writes too."""
    for key, (value, content_type) in POOL.items():
        request = kv_pb2.PutRequest(key=key, value_bytes=value, content_type=content_type)
        gateway.stub.Put(request, timeout=GRPC_TIMEOUT_S)
        if ledger is not None:
            ledger.puts[key] += 1


def snapshot(stub: kv_pb2_grpc.KeyValueStub) -> dict[str, kv_pb2.Entry]:
    """Every entry of the store, listed in pages over gRPC."""
    entries: dict[str, kv_pb2.Entry] = {}
    token = ""
    for _ in range(10_000):
        page = stub.List(kv_pb2.ListRequest(page_size=1000, page_token=token), timeout=GRPC_TIMEOUT_S)
        entries.update({entry.key: entry for entry in page.entries})
        token = page.next_page_token
        if not token:
            return entries
    raise AssertionError("the listing did not end")


def revision(stub: kv_pb2_grpc.KeyValueStub) -> int:
    return stub.Status(kv_pb2.StatusRequest(), timeout=GRPC_TIMEOUT_S).header.revision


def history_since(stub: kv_pb2_grpc.KeyValueStub, start: int, end: int) -> list[kv_pb2.Event]:
    """Every event with start <= revision <= end, replayed by a Watch of all keys."""
    events: list[kv_pb2.Event] = []
    if end < start:
        return events
    call = stub.Watch(kv_pb2.WatchRequest(key="", prefix=True, start_revision=start), timeout=60)
    try:
        for message in call:
            assert not message.HasField("cancel"), message.cancel
            events += [event for event in message.events if event.entry.mod_revision <= end]
            if message.header.revision >= end:
                break
    finally:
        call.cancel()  # type: ignore[no-untyped-call]  # grpc-stubs leaves cancel() untyped
    return events


def check_up_and_healthy(gateway: Gateway) -> None:
    assert gateway.server.process is not None
    assert gateway.server.process.poll() is None, "kv-server died"
    assert gateway.envoy is not None
    assert gateway.envoy.poll() is None, "Envoy died"
    health = gateway.request("GET", "/health")
    assert health.status == 200, health
    assert health.json()["status"] == "healthy", health
    with grpc.insecure_channel(gateway.server.address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in ("", "kv.v1.KeyValue"):
            answer = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=GRPC_TIMEOUT_S)
            assert answer.status == health_pb2.HealthCheckResponse.SERVING, service


def failure_report(ledger: Ledger) -> str:
    lines = [f"{len(ledger.failures)} distinct failures:"]
    for (label, kind), reports in sorted(ledger.failures.items()):
        lines.append(f"\n=== {label}: {kind} ({len(reports)} cases); the first:\n{reports[0]}")
    return "\n".join(lines)


@pytest.fixture
def hypothesis_restored() -> Iterator[None]:
    """On first use, schemathesis patches module globals of Hypothesis for the whole process (a
    printer that prints nothing, a larger buffer, ...: schemathesis.generation.hypothesis.setup).
    Put them back afterwards, so the Hypothesis tests that run later in the session (the store
    model, the fuzzer) still print their falsifying examples and keep their own limits. (The
    schemathesis pytest plugin patches them too, as pytest loads it: hence `-p no:schemathesis`.)"""
    from hypothesis import core as hypothesis_core
    from hypothesis.internal import entropy
    from hypothesis.internal.conjecture import engine
    from hypothesis.strategies._internal import collections as hypothesis_collections
    from hypothesis.strategies._internal import core as strategies_core
    from schemathesis.generation.hypothesis import setup

    patched: list[tuple[object, str]] = [
        (hypothesis_core, "RepresentationPrinter"),
        (hypothesis_core, "BUFFER_SIZE"),
        (engine, "BUFFER_SIZE"),
        (hypothesis_collections, "BUFFER_SIZE"),
        (strategies_core, "is_first_param_referenced_in_function"),
        (entropy, "register_random"),
        (setup, "_is_patched"),
    ]
    missing = object()
    saved = [(module, name, getattr(module, name, missing)) for module, name in patched]
    try:
        yield
    finally:
        for module, name, value in saved:
            if value is missing:
                if hasattr(module, name):
                    delattr(module, name)
            else:
                setattr(module, name, value)


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[Gateway]:
    """A fresh kv-server (SQLite) behind a fresh Envoy, stopped by PID at the end."""
    with running_gateway(tmp_path / "gateway") as running:
        yield running


@pytest.mark.slow
@pytest.mark.gateway
def test_generated_cases_get_no_server_error_documented_answers_and_change_nothing_when_rejected(
    hypothesis_restored: None, gateway: Gateway
) -> None:
    schema = schemathesis.openapi.from_path(DOCUMENT, config=schemathesis.Config())
    base_url = f"http://{gateway.host}"
    schema.config.update(base_url=base_url)
    schema.config.output.sanitization.update(enabled=False)  # reports show what was really sent
    stub = gateway.stub
    for key, value in SENTINELS.items():
        gateway.put(key, value)
    write_pool(gateway, None)
    before = snapshot(stub)
    first = revision(stub)

    ledger = Ledger()
    started = time.monotonic()
    with requests.Session() as session:
        Runner(gateway, base_url, session, ledger).run(schema)
    elapsed = time.monotonic() - started

    check_up_and_healthy(gateway)
    last = revision(stub)
    history = history_since(stub, first + 1, last)
    after = snapshot(stub)
    print(
        f"\n{ledger.total} schemathesis cases in {elapsed:.1f} s ({ledger.skipped} skipped as aimed at the"
        f" sentinels; no negative case possible for {len(ledger.unsatisfiable)} operations);"
        f" statuses {dict(sorted(ledger.statuses.items()))}; {ledger.silent_watches} accepted Watches"
        f" sent no line within {WATCH_WINDOW_S} s; {len(history)} events;"
        f" {len(ledger.failures)} distinct failures"
    )
    for kind in ("positive", "negative", "pool"):
        print(f"  {kind}: {sum(n for name, n in ledger.cases.items() if name.endswith(f'[{kind}]'))}")
    for (label, kind), reports in sorted(ledger.failures.items()):
        print(f"  FAILED {label}: {kind} ({len(reports)} cases)")

    assert ledger.total >= MIN_CASES
    sent = {name.rsplit(" [", 1)[0] for name in ledger.cases}
    assert sent == {operation.label for operation in operations(schema)}

    # Every revision is one event, and every event comes from a request that got a 2xx.
    assert [event.entry.mod_revision for event in history] == list(range(first + 1, last + 1))
    kinds: dict[int, list[str]] = {}
    for event in history:
        kinds.setdefault(event.type, []).append(event.entry.key)
    assert Counter(kinds.get(kv_pb2.Event.TYPE_PUT, [])) == ledger.puts
    assert len(kinds.get(kv_pb2.Event.TYPE_DELETE, [])) == ledger.deleted
    assert not ledger.deleted_keys - Counter(kinds.get(kv_pb2.Event.TYPE_DELETE, []))
    assert set(kinds.get(kv_pb2.Event.TYPE_EXPIRE, [])) <= ledger.ttl_keys

    # Every entry now stored is as it was before the run, or written by one of those events; every
    # entry gone was removed by one.
    puts = {(event.entry.key, event.entry.mod_revision) for event in history if event.type == event.TYPE_PUT}
    removed = {event.entry.key for event in history if event.type != event.TYPE_PUT}
    for key, entry in after.items():
        if entry.mod_revision <= first:
            assert before.get(key) == entry, (key, before.get(key), entry)
        else:
            assert (key, entry.mod_revision) in puts, (key, entry)
    assert all(key in removed for key in before.keys() - after.keys())
    assert {key: after.get(key) for key in SENTINELS} == {key: before[key] for key in SENTINELS}

    unexpected = [
        line for line in gateway.server.log().splitlines() if "unexpected" in line or "Traceback" in line
    ]
    assert not unexpected, "\n".join(unexpected[:20])

    # Last, so that a failed check does not hide the state of the store: every answer passed every check.
    if ledger.failures:
        pytest.fail(failure_report(ledger), pytrace=False)
