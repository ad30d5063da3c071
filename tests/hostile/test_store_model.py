"""A stateful model test of the stores: random sequences of writes, reads, replays, compactions
and expiries, checked step by step against a tiny in-test model (a dict, a revision counter and
an event list).

The model is written from the contract (proto/kv/v1/kv.proto, kvserver.store.base), not from the
planner, so the stores and the model can only agree by both being right. Expiry is made
deterministic by deadlines far in the past or future of the wall clock, and by reading and
expiring at explicit clocks (`now_ms`, `ExpireOp.now_ms`) before, at and after them.

Hypothesis drives the steps synchronously; each machine owns one event loop, on which its store is
opened, used and closed.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from kvserver.domain import (
    NO_EXPIRY,
    Compacted,
    CompactOp,
    CompactResult,
    Condition,
    ConditionFailed,
    DeleteOp,
    DeleteResult,
    Entry,
    Event,
    EventType,
    ExpireOp,
    ExpireResult,
    FutureRevision,
    KeyNotFound,
    KeyRange,
    KvError,
    Page,
    PutOp,
    PutResult,
    WriteOp,
    WriteResult,
    wall_clock_ms,
)
from kvserver.server import open_store
from kvserver.store.base import Store
from kvtest import server_config

T = TypeVar("T")

DAY_MS = 86_400_000
T0 = wall_clock_ms()
# Deadlines no test run can reach or be before: whether a key is expired at the wall clock never
# depends on timing. Two of each, so that expiry order (deadline, then key) is exercised too.
PAST = T0 - DAY_MS
FUTURE = T0 + 10 * DAY_MS
DEADLINES = [NO_EXPIRY, NO_EXPIRY, PAST, PAST - 1, FUTURE, FUTURE + 1]
# Explicit clocks for reads and for ExpireOp: before every deadline, the wall clock, after all.
EARLY = T0 - 2 * DAY_MS
LATE = T0 + 100 * DAY_MS
CLOCKS = ["early", "now", "late"]

KEYS = ["a", "a/1", "a/2", "a/2/x", "a\x00b", "ab", "b", "b/1", "é", "🔑"]
PREFIXES = ["", "a", "a/", "a/2", "b", "é", "x"]
EVERYTHING = KeyRange("", None)

keys = st.sampled_from(KEYS)
values = st.binary(max_size=6)
content_types = st.sampled_from(["", "text/plain"])
clocks = st.sampled_from(CLOCKS)


def clock_ms(name: str) -> int:
    return {"early": EARLY, "late": LATE}.get(name) or wall_clock_ms()


@dataclass(frozen=True)
class Span:
    """A key range for the store and the same range as a predicate for the model."""

    keys: KeyRange
    description: str
    contains: Callable[[str], bool] = field(compare=False)


def prefix_span(prefix: str) -> Span:
    return Span(KeyRange.prefix(prefix), f"prefix {prefix!r}", lambda key: key.startswith(prefix))


def interval_span(start: str, end: str | None) -> Span:
    return Span(
        KeyRange(start, end),
        f"[{start!r}, {end!r})",
        lambda key: start <= key and (end is None or key < end),
    )


spans = st.one_of(
    st.sampled_from(PREFIXES).map(prefix_span),
    st.builds(interval_span, st.sampled_from(["", *KEYS]), st.sampled_from([None, *KEYS])),
)


@st.composite
def conditions(draw: st.DrawFn, *, for_delete: bool = False) -> tuple[str, bool, int]:
    """A condition kind, whether its numbers should match the key as the model has it, and a
    number to use when they should not."""
    kinds = ["none", "mod_revision", "version", "mod_revision+version"]
    if not for_delete:
        kinds += ["absent", "present", "present+version"]
    return draw(st.sampled_from(kinds)), draw(st.booleans()), draw(st.integers(1, 40))


# The model.


def holds(condition: Condition, current: Entry | None) -> bool:
    if condition.must_not_exist:
        return current is None
    if condition.must_exist and current is None:
        return False
    if condition.mod_revision and (current is None or current.mod_revision != condition.mod_revision):
        return False
    return not (condition.version and (current is None or current.version != condition.version))


@dataclass
class Model:
    entries: dict[str, Entry] = field(default_factory=dict)
    revision: int = 0
    compact_revision: int = 0
    events: list[Event] = field(default_factory=list)

    def _emit(self, type_: EventType, key: str, entry: Entry | None, prev: Entry | None) -> None:
        self.revision += 1
        self.events.append(Event(type_, self.revision, key, entry, prev))
        if entry is None:
            del self.entries[key]
        else:
            self.entries[key] = entry

    def _live(self, key: str, now_ms: int) -> Entry | None:
        """A key found expired by a write is removed first, with an EXPIRE event of its own."""
        entry = self.entries.get(key)
        if entry is not None and entry.expired(now_ms):
            self._emit(EventType.EXPIRE, key, None, entry)
            return None
        return entry

    def write(self, op: WriteOp, now_ms: int) -> WriteResult:
        if isinstance(op, PutOp):
            current = self._live(op.key, now_ms)
            if not holds(op.condition, current):
                raise ConditionFailed(op.key, op.condition, current)
            revision = self.revision + 1
            entry = Entry(
                op.key,
                op.value,
                current.create_revision if current else revision,
                revision,
                current.version + 1 if current else 1,
                op.expire_at_ms,
                op.content_type,
            )
            self._emit(EventType.PUT, op.key, entry, current)
            return PutResult(self.revision, current is None, entry, current)
        if isinstance(op, DeleteOp):
            if op.prefix:
                found = [self._live(key, now_ms) for key in sorted(self.entries) if key.startswith(op.key)]
                victims = [entry for entry in found if entry is not None]
            else:
                current = self._live(op.key, now_ms)
                if not holds(op.condition, current):
                    raise ConditionFailed(op.key, op.condition, current)
                if current is None and not op.allow_missing:
                    raise KeyNotFound(op.key)
                victims = [current] if current is not None else []
            for entry in victims:
                self._emit(EventType.DELETE, entry.key, None, entry)
            return DeleteResult(self.revision, tuple(victims))
        if isinstance(op, ExpireOp):
            due = [entry for entry in self.entries.values() if entry.expired(op.now_ms)]
            due.sort(key=lambda entry: (entry.expire_at_ms, entry.key))
            for entry in due[: op.limit]:
                self._emit(EventType.EXPIRE, entry.key, None, entry)
            return ExpireResult(self.revision, len(due[: op.limit]))
        target = min(op.revision, self.revision)
        self.compact_revision = max(self.compact_revision, target)
        return CompactResult(target)

    def state_at(self, revision: int) -> dict[str, Entry]:
        state: dict[str, Entry] = {}
        for event in self.events[:revision]:
            if event.entry is None:
                del state[event.key]
            else:
                state[event.key] = event.entry
        return state

    def check_retained(self, revision: int) -> None:
        if revision > self.revision:
            raise FutureRevision(revision, self.revision)
        if revision < self.compact_revision:
            raise Compacted(revision, self.compact_revision)

    def range(
        self, span: Span, revision: int, after: str | None, limit: int, keys_only: bool, now_ms: int
    ) -> Page:
        self.check_retained(revision)
        state = self.state_at(revision)
        found = [
            state[key]
            for key in sorted(state)
            if span.contains(key) and (after is None or key > after) and not state[key].expired(now_ms)
        ]
        entries = found[:limit]
        if keys_only:
            entries = [entry.without_value() for entry in entries]
        return Page(revision, tuple(entries), more=len(found) > limit)

    def count(self, span: Span, revision: int, now_ms: int) -> int:
        self.check_retained(revision)
        state = self.state_at(revision)
        return sum(1 for key, entry in state.items() if span.contains(key) and not entry.expired(now_ms))

    def replay(self, span: Span, start: int, end: int, limit: int) -> list[Event]:
        if start <= self.compact_revision:
            raise Compacted(start, self.compact_revision)
        selected = [
            event for event in self.events if start <= event.revision <= end and span.contains(event.key)
        ]
        return selected[:limit]


def outcome(call: Callable[[], T]) -> T | KvError:
    try:
        return call()
    except KvError as error:
        return error


def same(store_outcome: object, model_outcome: object, what: str) -> None:
    """The store did what the model did: the same result, or an error of the same kind."""
    if isinstance(model_outcome, KvError) or isinstance(store_outcome, KvError):
        assert type(store_outcome) is type(model_outcome), (
            f"{what}: store gave {store_outcome!r}, model {model_outcome!r}"
        )
        assert getattr(store_outcome, "key", None) == getattr(model_outcome, "key", None), what
        return
    assert store_outcome == model_outcome, f"{what}:\n store {store_outcome!r}\n model {model_outcome!r}"


# The machine.


class StoreMachine(RuleBasedStateMachine):
    store_name = "memory"

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.directory = Path(tempfile.mkdtemp(prefix="kv-model-"))
        self.config = server_config(self.directory, self.store_name)
        self.store: Store | None = self.run(open_store(self.config))
        self.model = Model()

    def run(self, awaitable: Awaitable[T]) -> T:
        async def wrapped() -> T:
            return await awaitable

        return self.loop.run_until_complete(wrapped())

    def attempt(self, awaitable: Awaitable[T]) -> T | KvError:
        try:
            return self.run(awaitable)
        except KvError as error:
            return error

    @property
    def opened(self) -> Store:
        assert self.store is not None
        return self.store

    def teardown(self) -> None:
        try:
            if self.store is not None:
                self.run(self.store.close())
                self.store = None
            self.loop.run_until_complete(self.loop.shutdown_default_executor())
        finally:
            self.loop.close()
            shutil.rmtree(self.directory, ignore_errors=True)

    def write(self, op: WriteOp, what: str) -> None:
        before = self.model.revision
        expected = outcome(lambda: self.model.write(op, wall_clock_ms()))
        same(self.attempt(self.opened.write(op)), expected, f"{what}: {op!r} at revision {before}")

    def pick_condition(self, key: str, spec: tuple[str, bool, int]) -> Condition:
        kind, matching, number = spec
        current = self.model.entries.get(key)
        mod_revision = current.mod_revision if matching and current else number
        version = current.version if matching and current else number
        return {
            "none": Condition(),
            "absent": Condition(must_not_exist=True),
            "present": Condition(must_exist=True),
            "present+version": Condition(must_exist=True, version=version),
            "mod_revision": Condition(mod_revision=mod_revision),
            "version": Condition(version=version),
            "mod_revision+version": Condition(mod_revision=mod_revision, version=version),
        }[kind]

    def pick_revision(self, choice: int) -> int:
        """A retained revision, from the compact revision to the current one."""
        return self.model.compact_revision + choice % (self.model.revision - self.model.compact_revision + 1)

    # Writes.

    @rule(
        key=keys,
        value=values,
        deadline=st.sampled_from(DEADLINES),
        condition=conditions(),
        content_type=content_types,
    )
    def put(
        self, key: str, value: bytes, deadline: int, condition: tuple[str, bool, int], content_type: str
    ) -> None:
        op = PutOp(key, value, deadline, self.pick_condition(key, condition), content_type)
        self.write(op, "put")

    @rule(key=keys, allow_missing=st.booleans(), condition=conditions(for_delete=True))
    def delete(self, key: str, allow_missing: bool, condition: tuple[str, bool, int]) -> None:
        op = DeleteOp(key, allow_missing=allow_missing, condition=self.pick_condition(key, condition))
        self.write(op, "delete")

    @rule(prefix=st.sampled_from(PREFIXES))
    def delete_prefix(self, prefix: str) -> None:
        self.write(DeleteOp(prefix, prefix=True), "delete prefix")

    @rule(clock=clocks, limit=st.integers(1, 4))
    def expire(self, clock: str, limit: int) -> None:
        self.write(ExpireOp(clock_ms(clock), limit), f"expire at the {clock} clock")

    @rule(choice=st.integers(0, 1000), beyond=st.integers(0, 2))
    def compact(self, choice: int, beyond: int) -> None:
        self.write(CompactOp(self.pick_revision(choice) + beyond), "compact")

    @precondition(lambda self: self.store_name != "memory")
    @rule()
    def reopen(self) -> None:
        """Close the store and open its file again: everything committed is still there."""
        self.run(self.opened.close())
        self.store = None
        self.store = self.run(open_store(self.config))

    # Reads.

    @rule(key=keys, clock=clocks)
    def get(self, key: str, clock: str) -> None:
        now = clock_ms(clock)
        entry = self.model.entries.get(key)
        expected = (self.model.revision, entry if entry is not None and not entry.expired(now) else None)
        same(self.run(self.opened.get(key, now)), expected, f"get {key!r} at the {clock} clock")

    @rule(
        span=spans,
        choice=st.integers(0, 1000),
        at_current=st.booleans(),
        after=st.sampled_from([None, *KEYS]),
        limit=st.integers(1, 5),
        keys_only=st.booleans(),
        clock=clocks,
    )
    def range(
        self,
        span: Span,
        choice: int,
        at_current: bool,
        after: str | None,
        limit: int,
        keys_only: bool,
        clock: str,
    ) -> None:
        revision = self.model.revision if at_current else self.pick_revision(choice)
        now = clock_ms(clock)
        expected = outcome(lambda: self.model.range(span, revision, after, limit, keys_only, now))
        found = self.attempt(
            self.opened.range(
                span.keys, revision=revision, after=after, limit=limit, keys_only=keys_only, now_ms=now
            )
        )
        same(found, expected, f"range {span.description} at {revision} after {after!r} limit {limit}")
        counted = self.attempt(self.opened.count(span.keys, revision=revision, now_ms=now))
        same(counted, outcome(lambda: self.model.count(span, revision, now)), f"count {span.description}")

    @rule(distance=st.integers(1, 3), below=st.booleans())
    def range_outside_history(self, distance: int, below: bool) -> None:
        """A revision above the current one, or below the compact revision, is refused."""
        revision = self.model.compact_revision - distance if below else self.model.revision + distance
        if revision < 0:
            return
        expected = outcome(lambda: self.model.range(prefix_span(""), revision, None, 10, False, T0))
        found = self.attempt(
            self.opened.range(EVERYTHING, revision=revision, after=None, limit=10, keys_only=False, now_ms=T0)
        )
        same(found, expected, f"range at {revision}")

    @rule(span=spans, start=st.integers(0, 1000), length=st.integers(-1, 8), limit=st.integers(1, 6))
    def replay(self, span: Span, start: int, length: int, limit: int) -> None:
        """Events from any start, retained or not, up to any end, within a limit."""
        first = start % (self.model.revision + 3)
        last = first + length
        expected = outcome(lambda: self.model.replay(span, first, last, limit))
        found = self.attempt(
            self.opened.events(span.keys, start_revision=first, end_revision=last, limit=limit)
        )
        same(found, expected, f"events of {span.description} from {first} to {last}")

    # Invariants.

    @invariant()
    def counters_and_history_agree(self) -> None:
        store, model = self.opened, self.model
        assert (store.revision, store.compact_revision) == (model.revision, model.compact_revision)
        stats = self.run(store.stats())
        assert (stats.revision, stats.compact_revision, stats.key_count) == (
            model.revision,
            model.compact_revision,
            len(model.entries),
        )
        deadlines = [entry.expire_at_ms for entry in model.entries.values() if entry.expire_at_ms]
        assert self.run(store.next_expiry()) == (min(deadlines) if deadlines else None)
        if model.revision > model.compact_revision:
            history = self.run(
                store.events(
                    EVERYTHING,
                    start_revision=model.compact_revision + 1,
                    end_revision=model.revision,
                    limit=100_000,
                )
            )
            assert history == model.events[model.compact_revision :]


MACHINES: dict[str, type[StoreMachine]] = {
    name: type(f"StoreMachine_{name.replace('+', '_')}", (StoreMachine,), {"store_name": name})
    for name in ("memory", "sqlite", "sqlite+cache")
}

# KV_MODEL_EXAMPLES=500 for a longer search (`make test-hostile-long`).
SETTINGS = settings(
    max_examples=int(os.environ.get("KV_MODEL_EXAMPLES", "40")),
    stateful_step_count=30,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)


@pytest.mark.parametrize("store_name", list(MACHINES))
def test_store_matches_the_model(store_name: str) -> None:
    run_state_machine_as_test(MACHINES[store_name], settings=SETTINGS)


@pytest.mark.parametrize("store_name", list(MACHINES))
async def test_expiry_follows_the_operations_clock_and_breaks_ties_by_key(
    tmp_path: Path, store_name: str
) -> None:
    """What the machine found in the SQLite store, pinned: ExpireOp(now_ms) expires what is due by
    its own clock (not the commit's), and keys with the same deadline go in key order."""
    store = await open_store(server_config(tmp_path, store_name))
    try:
        await store.write(PutOp("later", b"", FUTURE))
        for key in ("c", "b", "a"):
            await store.write(PutOp(key, b"", PAST))
        assert await store.write(ExpireOp(wall_clock_ms(), 2)) == ExpireResult(6, 2)
        assert await store.write(ExpireOp(LATE, 10)) == ExpireResult(8, 2)
        events = await store.events(EVERYTHING, start_revision=5, end_revision=8, limit=10)
        assert [(event.type, event.key) for event in events] == [
            (EventType.EXPIRE, "a"),
            (EventType.EXPIRE, "b"),
            (EventType.EXPIRE, "c"),
            (EventType.EXPIRE, "later"),
        ]
    finally:
        await store.close()
