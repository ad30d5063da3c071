"""The key-value semantics of the service: validation, limits, TTLs and consistent listings.

Every front end (gRPC, and through Envoy, REST) reaches the store through this class, so the
rules are checked in one place. Validation errors name the request field at fault.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from kvserver.config import Limits
from kvserver.domain import (
    ALWAYS,
    NO_EXPIRY,
    Condition,
    DeleteOp,
    DeleteResult,
    Entry,
    InvalidArgument,
    KeyNotFound,
    KeyRange,
    KvError,
    PutOp,
    PutResult,
    StoreStats,
    expect,
    wall_clock_ms,
)
from kvserver.service.pagination import Cursor, PageTokens, fingerprint
from kvserver.store.base import Store

_MAX_CONTENT_TYPE_CHARS = 256
MAX_BATCH_PUTS = 1000
"""The most puts one BatchPut may carry (the contract says 1000)."""
# 9999-12-31T23:59:59.999Z: the latest instant a google.protobuf.Timestamp (expire_time) can hold.
_LATEST_DEADLINE_MS = 253_402_300_799_999


@dataclass(frozen=True, slots=True)
class Conditions:
    """The conditions of a write request, as the client stated them."""

    if_absent: bool = False
    if_present: bool = False
    if_mod_revision: int = 0
    if_version: int = 0


NO_CONDITIONS = Conditions()
"""The conditions of an unconditional write (shared: a bulk load makes many)."""


@dataclass(frozen=True, slots=True)
class PutSpec:
    """One put of a batch, as the client stated it (the arguments of `KvService.put`)."""

    key: str
    value: bytes
    ttl_ms: int = 0
    conditions: Conditions = NO_CONDITIONS
    content_type: str = ""


@dataclass(frozen=True, slots=True)
class BatchOutcome:
    """The outcome of a batch: one result per put, in request order, each a PutResult or the
    KvError that kept that put from applying; `revision` is the store's after the batch."""

    revision: int
    results: tuple[PutResult | KvError, ...]


@dataclass(frozen=True, slots=True)
class ListQuery:
    prefix: str = ""
    start_key: str = ""
    end_key: str = ""
    page_size: int = 0
    page_token: str = ""
    keys_only: bool = False
    include_count: bool = False


@dataclass(frozen=True, slots=True)
class ListPage:
    revision: int
    entries: tuple[Entry, ...]
    next_page_token: str
    count: int


class KvService:
    def __init__(self, store: Store, limits: Limits, page_tokens: PageTokens) -> None:
        self.store = store
        self.limits = limits
        self._tokens = page_tokens

    async def get(self, key: str, *, local: bool = False) -> tuple[int, Entry]:
        """The key and the revision it was read at; `local` allows a replicated store to answer
        from this server's copy (see Consistency in the contract)."""
        self.check_key(key)
        revision, entry = await self.store.get(key, wall_clock_ms(), serializable=local)
        if entry is None:
            raise KeyNotFound(key)
        return revision, entry

    async def put(
        self,
        key: str,
        value: bytes,
        *,
        ttl_ms: int = 0,
        conditions: Conditions = Conditions(),
        content_type: str = "",
    ) -> PutResult:
        op = self._put_op(PutSpec(key, value, ttl_ms, conditions, content_type))
        return expect(await self.store.write(op), PutResult)

    async def put_many(self, puts: Sequence[PutSpec]) -> BatchOutcome:
        """Apply `puts` in order, each on its own as `put` would (not atomically as a group).

        Every put is validated first: one invalid put fails the whole batch with an
        InvalidArgument naming it (`puts[3].key`) and nothing is written. Then every put is
        submitted to the store at once, in order, so that a store that groups the writes queued
        together (SQLite) commits the batch in as few transactions as it can; the store applies
        them in submission order. A put that fails (a condition, the storage) gets its KvError
        in its result and the others still apply. Returns when every applied put is durable.
        """
        if not puts:
            raise InvalidArgument("puts", "must hold at least one put")
        if len(puts) > MAX_BATCH_PUTS:
            raise InvalidArgument("puts", f"{len(puts)} puts is over the maximum of {MAX_BATCH_PUTS}")
        ops = []
        for index, spec in enumerate(puts):
            try:
                ops.append(self._put_op(spec))
            except InvalidArgument as error:
                field_name = f"puts[{index}].{error.field_name}"
                problem = str(error).removeprefix(f"{error.field_name}: ")
                raise InvalidArgument(field_name, problem) from None
        outcomes = await self.store.write_many(ops)
        results: list[PutResult | KvError] = [
            outcome if isinstance(outcome, KvError) else expect(outcome, PutResult) for outcome in outcomes
        ]
        applied = [result.revision for result in results if isinstance(result, PutResult)]
        return BatchOutcome(max([self.store.revision, *applied]), tuple(results))

    def _put_op(self, spec: PutSpec) -> PutOp:
        """The validated write of one put."""
        self.check_key(spec.key)
        if len(spec.value) > self.limits.max_value_bytes:
            raise InvalidArgument(
                "value", f"{len(spec.value)} bytes is over the limit of {self.limits.max_value_bytes} bytes"
            )
        if spec.ttl_ms < 0:
            raise InvalidArgument("ttl_ms", "must not be negative")
        condition = ALWAYS if spec.conditions is NO_CONDITIONS else _condition(spec.conditions)
        expire_at = wall_clock_ms() + spec.ttl_ms if spec.ttl_ms else NO_EXPIRY
        if expire_at > _LATEST_DEADLINE_MS:
            raise InvalidArgument("ttl_ms", f"{spec.ttl_ms} puts the deadline after the year 9999")
        if len(spec.content_type) > _MAX_CONTENT_TYPE_CHARS:
            raise InvalidArgument("content_type", f"is longer than {_MAX_CONTENT_TYPE_CHARS} characters")
        return PutOp(spec.key, spec.value, expire_at, condition, spec.content_type)

    async def delete(
        self,
        key: str,
        *,
        prefix: bool = False,
        allow_missing: bool = False,
        conditions: Conditions = Conditions(),
    ) -> DeleteResult:
        if prefix:
            self.check_key(key, allow_empty=True)
            if conditions != Conditions():
                raise InvalidArgument("prefix", "a prefix deletion cannot have conditions")
        else:
            self.check_key(key)
        if conditions.if_absent or conditions.if_present:
            raise InvalidArgument("conditions", "Delete accepts only if_mod_revision and if_version")
        op = DeleteOp(key, prefix, allow_missing, _condition(conditions))
        return expect(await self.store.write(op), DeleteResult)

    async def list(self, query: ListQuery) -> ListPage:
        keys = self._list_range(query)
        page_size = self._page_size(query.page_size)
        request_id = fingerprint(query.prefix, query.start_key, query.end_key, query.keys_only)
        if query.page_token:
            cursor = self._tokens.decode(query.page_token, request_id)
            revision, after = cursor.revision, cursor.after
        else:
            revision, after = self.store.revision, None
        now = wall_clock_ms()
        page = await self.store.range(
            keys, revision=revision, after=after, limit=page_size, keys_only=query.keys_only, now_ms=now
        )
        entries, truncated = self._within_response_budget(page.entries)
        next_token = ""
        if (page.more or truncated) and entries:
            next_token = self._tokens.encode(Cursor(revision, entries[-1].key), request_id)
        count = await self.store.count(keys, revision=revision, now_ms=now) if query.include_count else 0
        return ListPage(revision, entries, next_token, count)

    async def status(self) -> StoreStats:
        return await self.store.stats()

    def check_key(self, key: str, *, field_name: str = "key", allow_empty: bool = False) -> None:
        if not key and not allow_empty:
            raise InvalidArgument(field_name, "must not be empty")
        size = len(key.encode())
        if size > self.limits.max_key_bytes:
            raise InvalidArgument(
                field_name, f"{size} bytes is over the limit of {self.limits.max_key_bytes} bytes"
            )

    def _list_range(self, query: ListQuery) -> KeyRange:
        if query.prefix and (query.start_key or query.end_key):
            raise InvalidArgument("prefix", "cannot be combined with start_key or end_key")
        for name, key in (
            ("prefix", query.prefix),
            ("start_key", query.start_key),
            ("end_key", query.end_key),
        ):
            self.check_key(key, field_name=name, allow_empty=True)
        if query.prefix:
            return KeyRange.prefix(query.prefix)
        if query.end_key and query.end_key <= query.start_key:
            raise InvalidArgument("end_key", "must be greater than start_key")
        return KeyRange(query.start_key, query.end_key or None)

    def _page_size(self, requested: int) -> int:
        if requested < 0:
            raise InvalidArgument("page_size", "must not be negative")
        if requested > self.limits.max_page_size:
            raise InvalidArgument(
                "page_size", f"{requested} is over the maximum of {self.limits.max_page_size}"
            )
        return requested or self.limits.default_page_size

    def _within_response_budget(self, entries: tuple[Entry, ...]) -> tuple[tuple[Entry, ...], bool]:
        """The leading entries that fit the response size budget (always at least one)."""
        total = 0
        for index, entry in enumerate(entries):
            # Keys count in UTF-8 bytes, as sent, with room for the entry's other fields.
            total += len(entry.key.encode()) + len(entry.value) + _ENTRY_OVERHEAD_BYTES
            if total > self.limits.max_response_bytes and index > 0:
                return entries[:index], True
        return entries, False


# Bytes an entry takes in a response besides its key and value (revisions, version, expire_time).
_ENTRY_OVERHEAD_BYTES = 64


def _condition(conditions: Conditions) -> Condition:
    if conditions.if_mod_revision < 0:
        raise InvalidArgument("if_mod_revision", "must not be negative")
    if conditions.if_version < 0:
        raise InvalidArgument("if_version", "must not be negative")
    if conditions.if_absent and (
        conditions.if_present or conditions.if_mod_revision or conditions.if_version
    ):
        raise InvalidArgument("if_absent", "contradicts if_present, if_mod_revision and if_version")
    return Condition(
        must_exist=conditions.if_present,
        must_not_exist=conditions.if_absent,
        mod_revision=conditions.if_mod_revision,
        version=conditions.if_version,
    )
