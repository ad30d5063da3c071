"""The SQL of the store's file: its schema, the statements that persist a planned batch and
prefetch what a batch reads, and the conversion of rows to entries and events."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from kvserver.domain import DeleteOp, Entry, Event, EventType, ExpireOp, KeyRange, PutOp, WriteOp
from kvserver.store.planner import BatchPlan

# SQLite allows 32766 bound parameters per statement.
ROWS_PER_INSERT = 1000
ENTRY_COLUMNS = "key, value, create_revision, mod_revision, version, expire_at_ms, content_type"

SCHEMA = [
    "ALTER TABLE kv ADD COLUMN create_revision INTEGER NOT NULL DEFAULT 0",
    "ALTER TABLE kv ADD COLUMN mod_revision INTEGER NOT NULL DEFAULT 0",
    "ALTER TABLE kv ADD COLUMN version INTEGER NOT NULL DEFAULT 0",
    "ALTER TABLE kv ADD COLUMN expire_at_ms INTEGER NOT NULL DEFAULT 0",
    "ALTER TABLE kv ADD COLUMN content_type TEXT NOT NULL DEFAULT ''",
    "CREATE INDEX kv_deadlines ON kv (expire_at_ms) WHERE expire_at_ms > 0",
    """CREATE TABLE kv_events (
        revision INTEGER PRIMARY KEY,
        type INTEGER NOT NULL,
        key TEXT NOT NULL,
        time_ms INTEGER NOT NULL,
        value BLOB,
        create_revision INTEGER,
        version INTEGER,
        expire_at_ms INTEGER,
        content_type TEXT,
        prev_value BLOB,
        prev_create_revision INTEGER,
        prev_mod_revision INTEGER,
        prev_version INTEGER,
        prev_expire_at_ms INTEGER,
        prev_content_type TEXT
    )""",
    "CREATE INDEX kv_events_by_key ON kv_events (key, revision)",
    "CREATE TABLE kv_state (name TEXT PRIMARY KEY, value INTEGER NOT NULL)",
    "INSERT INTO kv_state VALUES ('revision', 0), ('compact_revision', 0), ('schema', 1)",
]


class _Prefetched:
    """The committed state that a batch reads, fetched before it is planned."""

    def __init__(self) -> None:
        self.entries: dict[str, Entry | None] = {}
        self.ranges: list[tuple[KeyRange, list[Entry]]] = []
        self.due_entries: list[Entry] = []

    def lookup(self, key: str) -> Entry | None:
        return self.entries.get(key)

    def scan(self, keys: KeyRange) -> Iterable[Entry]:
        for fetched_range, entries in self.ranges:
            if fetched_range == keys:
                return entries
        raise AssertionError(f"range {keys} was not prefetched")

    def due(self, now_ms: int, limit: int) -> Iterable[Entry]:
        return [entry for entry in self.due_entries if entry.expired(now_ms)][:limit]


class Prefetch:
    """The committed state a batch reads: the SELECTs that fetch it, and the view of their rows."""

    def __init__(self, ops: list[WriteOp], now_ms: int) -> None:
        self.keys = sorted({op.key for op in ops if isinstance(op, PutOp | DeleteOp) and not _is_prefix(op)})
        self.queries: list[tuple[str, Sequence[Any]]] = []
        for start in range(0, len(self.keys), ROWS_PER_INSERT):
            chunk = self.keys[start : start + ROWS_PER_INSERT]
            placeholders = ",".join("?" * len(chunk))
            self.queries.append((f"SELECT {ENTRY_COLUMNS} FROM kv WHERE key IN ({placeholders})", chunk))
        self._key_queries = len(self.queries)
        self.prefixes = [KeyRange.prefix(op.key) for op in ops if isinstance(op, DeleteOp) and op.prefix]
        self.queries += [range_query(keys_range) for keys_range in self.prefixes]
        expires = [op for op in ops if isinstance(op, ExpireOp)]
        expire_limit = sum(op.limit for op in expires)
        # Due by the operations' own clocks (not the batch's), in the planner's order: deadline, key.
        due_by = max((op.now_ms for op in expires), default=now_ms)
        self._due = expire_limit > 0
        if self._due:
            self.queries.append(
                (
                    f"SELECT {ENTRY_COLUMNS} FROM kv WHERE expire_at_ms > 0 AND expire_at_ms <= ? "
                    "ORDER BY expire_at_ms, key LIMIT ?",
                    (due_by, expire_limit),
                )
            )

    def state(self, results: list[list[tuple[Any, ...]]]) -> _Prefetched:
        """The view of the committed state from the rows of `queries`, in their order."""
        state = _Prefetched()
        state.entries = dict.fromkeys(self.keys)
        rows_of = iter(results)
        for _ in range(self._key_queries):
            state.entries.update((row[0], entry_from_row(row)) for row in next(rows_of))
        for keys_range in self.prefixes:
            state.ranges.append((keys_range, [entry_from_row(row) for row in next(rows_of)]))
        if self._due:
            state.due_entries = [entry_from_row(row) for row in next(rows_of)]
        for entries in [state.due_entries, *(entries for _, entries in state.ranges)]:
            state.entries.update((entry.key, entry) for entry in entries)
        return state


def _is_prefix(op: WriteOp) -> bool:
    return isinstance(op, DeleteOp) and op.prefix


def entry_from_row(row: Sequence[Any]) -> Entry:
    key, value, create_revision, mod_revision, version, expire_at_ms, content_type = row
    return Entry(key, bytes(value or b""), create_revision, mod_revision, version, expire_at_ms, content_type)


def range_query(keys: KeyRange) -> tuple[str, list[Any]]:
    if keys.end is None:
        return f"SELECT {ENTRY_COLUMNS} FROM kv WHERE key >= ?", [keys.start]
    return f"SELECT {ENTRY_COLUMNS} FROM kv WHERE key >= ? AND key < ?", [keys.start, keys.end]


def snapshot_query(
    keys: KeyRange, revision: int, after: str | None, limit: int | None, *, keys_only: bool
) -> tuple[str, list[Any]]:
    """The entries of a range as of `revision`: a key changed since then shows its state from
    before its first later change (kept with that event); any other key shows its current row."""
    lower = after if after is not None and after >= keys.start else keys.start
    lower_op = ">" if after is not None and after >= keys.start else ">="
    bounds = f"key {lower_op} ?" + (" AND key < ?" if keys.end is not None else "")
    bound_args: list[Any] = [lower] + ([keys.end] if keys.end is not None else [])
    limit_clause = "LIMIT ?" if limit is not None else ""
    value = "NULL" if keys_only else "kv.value"
    prev_value = "NULL" if keys_only else "e.prev_value"
    sql = f"""
        WITH candidates(key) AS (
            SELECT key FROM kv WHERE {bounds}
            UNION
            SELECT key FROM kv_events WHERE revision > ? AND {bounds}
            ORDER BY key {limit_clause}
        )
        SELECT c.key,
               kv.create_revision AS cur_create, kv.expire_at_ms AS cur_expire,
               e.revision AS changed,
               e.prev_create_revision AS prev_create, e.prev_expire_at_ms AS prev_expire,
               {value}, kv.mod_revision, kv.version, kv.content_type,
               {prev_value}, e.prev_mod_revision, e.prev_version, e.prev_content_type,
               (SELECT value FROM kv_state WHERE name = 'compact_revision') AS compacted
        FROM candidates c
        LEFT JOIN kv ON kv.key = c.key
        LEFT JOIN kv_events e
          ON e.revision = (SELECT MIN(revision) FROM kv_events WHERE key = c.key AND revision > ?)
        ORDER BY c.key"""
    args = [*bound_args, revision, *bound_args, *([limit] if limit is not None else []), revision]
    return sql, args


COMPACTED = 14  # the column of a snapshot row that carries the compact revision


def snapshot_entry(row: Sequence[Any]) -> Entry | None:
    key, create, expire, changed, p_create, p_expire, value, mod, version, c_type = row[:10]
    p_value, p_mod, p_version, p_type = row[10:14]
    if changed is None:
        if create is None:
            return None
        return Entry(key, bytes(value or b""), create, mod, version, expire, c_type)
    if p_create is None:
        return None
    return Entry(key, bytes(p_value or b""), p_create, p_mod, p_version, p_expire, p_type)


def event_from_row(row: Sequence[Any]) -> Event:
    revision, type_, key, value, create, version, expire, c_type = row[:8]
    p_value, p_create, p_mod, p_version, p_expire, p_type = row[8:]
    event_type = EventType(type_)
    entry = None
    if event_type is EventType.PUT:
        entry = Entry(key, bytes(value or b""), create, revision, version, expire, c_type)
    prev = None
    if p_create is not None:
        prev = Entry(key, bytes(p_value or b""), p_create, p_mod, p_version, p_expire, p_type)
    return Event(event_type, revision, key, entry, prev)


def plan_statements(plan: BatchPlan, now_ms: int) -> list[tuple[str, list[Any]]]:
    """The SQL that persists a planned batch (inside the caller's transaction)."""
    statements: list[tuple[str, list[Any]]] = []
    event_rows = [_event_row(event, now_ms) for event in plan.events]
    statements += _inserts("INSERT INTO kv_events VALUES", event_rows)
    upserts, deletes = plan.final_rows()
    entry_rows = [_entry_row(entry) for entry in upserts.values()]
    upsert = f"INSERT INTO kv ({ENTRY_COLUMNS}) VALUES"
    statements += [
        (
            sql + " ON CONFLICT(key) DO UPDATE SET value = excluded.value, "
            "create_revision = excluded.create_revision, mod_revision = excluded.mod_revision, "
            "version = excluded.version, expire_at_ms = excluded.expire_at_ms, "
            "content_type = excluded.content_type",
            args,
        )
        for sql, args in _inserts(upsert, entry_rows)
    ]
    deleted_keys = sorted(deletes)
    for start in range(0, len(deleted_keys), ROWS_PER_INSERT):
        keys = deleted_keys[start : start + ROWS_PER_INSERT]
        statements.append((f"DELETE FROM kv WHERE key IN ({','.join('?' * len(keys))})", list(keys)))
    if plan.events:
        statements.append(("UPDATE kv_state SET value = ? WHERE name = 'revision'", [plan.revision]))
    if plan.compact_revision is not None:
        statements.append(("DELETE FROM kv_events WHERE revision <= ?", [plan.compact_revision]))
        statements.append(
            (
                "UPDATE kv_state SET value = MAX(value, ?) WHERE name = 'compact_revision'",
                [plan.compact_revision],
            )
        )
    return statements


def _event_row(event: Event, now_ms: int) -> list[Any]:
    """A kv_events row: the event, the key's new state (for a PUT), its previous state (if any)."""
    new, old = event.entry, event.prev
    row: list[Any] = [event.revision, int(event.type), event.key, now_ms]
    row += (
        [new.value, new.create_revision, new.version, new.expire_at_ms, new.content_type]
        if new
        else [None] * 5
    )
    if old is None:
        return row + [None] * 6
    return [
        *row,
        old.value,
        old.create_revision,
        old.mod_revision,
        old.version,
        old.expire_at_ms,
        old.content_type,
    ]


def _entry_row(entry: Entry) -> list[Any]:
    return [
        entry.key,
        entry.value,
        entry.create_revision,
        entry.mod_revision,
        entry.version,
        entry.expire_at_ms,
        entry.content_type,
    ]


def _inserts(prefix: str, rows: list[list[Any]]) -> list[tuple[str, list[Any]]]:
    """Multi-row INSERT statements for `rows`, within SQLite's limit of bound parameters."""
    if not rows:
        return []
    width = len(rows[0])
    per_statement = max(ROWS_PER_INSERT // width, 1)
    placeholder = "(" + ",".join("?" * width) + ")"
    statements = []
    for start in range(0, len(rows), per_statement):
        chunk = rows[start : start + per_statement]
        statements.append(
            (f"{prefix} {','.join([placeholder] * len(chunk))}", [v for row in chunk for v in row])
        )
    return statements
