"""How the ``kv`` command shows results: readable text for people, JSON for programs."""

from __future__ import annotations

import base64
import json
import unicodedata
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from kvclient.models import (
    DeleteResult,
    Entry,
    ListResult,
    PutResult,
    ServerStatus,
    WatchEvent,
)

__all__ = [
    "delete_json",
    "delete_text",
    "duration",
    "entry_json",
    "event_json",
    "event_text",
    "list_json",
    "list_table",
    "put_json",
    "put_text",
    "show_value",
    "status_json",
    "status_text",
    "timestamp",
]

JsonObject = dict[str, Any]


def timestamp(when: datetime | None) -> str | None:
    """RFC 3339 in UTC with milliseconds: ``2025-01-31T12:00:00.250Z``."""
    if when is None:
        return None
    return when.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def duration(seconds: float) -> str:
    """A short readable duration: ``850ms``, ``1.5s``, ``2m05s``, ``3h07m``, ``2d04h``."""
    if seconds < 1:
        return f"{round(seconds * 1000)}ms"
    if seconds < 10:
        return f"{seconds:.1f}s".replace(".0s", "s")
    total = round(seconds)
    days, rest = divmod(total, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d{hours:02d}h"
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


def _printable(text: str) -> bool:
    return all(unicodedata.category(c)[0] != "C" for c in text)


def show_value(value: bytes, width: int = 60) -> str:
    """A value on one line: its text when printable, JSON-escaped text when it has control
    characters, ``<N bytes>`` when it is not UTF-8; cut to ``width`` characters."""
    try:
        text = value.decode("utf-8")
    except UnicodeDecodeError:
        return f"<{len(value)} bytes>"
    if not _printable(text):
        text = json.dumps(text, ensure_ascii=False)
    if len(text) > width:
        text = text[: width - 1] + "…"
    return text


def _ttl(entry: Entry, now: datetime) -> str:
    remaining = entry.ttl(now)
    return "-" if remaining is None else duration(remaining)


# --------------------------------------------------------------------------- JSON


def entry_json(entry: Entry, *, with_value: bool = True) -> JsonObject:
    """An entry as in the contract's JSON: ``value`` (text) or ``value_bytes`` (base64)."""
    out: JsonObject = {"key": entry.key}
    if with_value:
        try:
            out["value"] = entry.value.decode("utf-8")
        except UnicodeDecodeError:
            out["value_bytes"] = base64.b64encode(entry.value).decode("ascii")
    out.update(
        create_revision=entry.create_revision,
        mod_revision=entry.mod_revision,
        version=entry.version,
        expires_at=timestamp(entry.expires_at),
    )
    if entry.content_type:
        out["content_type"] = entry.content_type
    return out


def put_json(result: PutResult) -> JsonObject:
    """A put's outcome."""
    out: JsonObject = {"revision": result.revision, "created": result.created}
    out.update(entry_json(result.entry, with_value=False))
    if result.prev_entry is not None:
        out["prev_entry"] = entry_json(result.prev_entry)
    return out


def delete_json(result: DeleteResult, *, with_previous: bool) -> JsonObject:
    """A delete's outcome."""
    out: JsonObject = {"revision": result.revision, "deleted": result.deleted}
    if with_previous:
        out["prev_entries"] = [entry_json(e) for e in result.prev_entries]
    return out


def list_json(result: ListResult, *, keys_only: bool) -> JsonObject:
    """A listing."""
    out: JsonObject = {
        "revision": result.revision,
        "entries": [entry_json(e, with_value=not keys_only) for e in result.entries],
        "truncated": result.truncated,
    }
    if result.count is not None:
        out["total"] = result.count
    return out


def event_json(event: WatchEvent) -> JsonObject:
    """A watch event (one line of ``kv watch -o json``)."""
    out: JsonObject = {"type": event.type.value, "revision": event.revision}
    if event.initial:
        out["initial"] = True
    if event.type.value == "PUT":
        out.update(entry_json(event.entry))
    else:
        out["key"] = event.key
    if event.prev_entry is not None:
        out["prev_entry"] = entry_json(event.prev_entry)
    return out


def status_json(status: ServerStatus) -> JsonObject:
    """The server's status."""
    limits = status.limits
    return {
        "revision": status.revision,
        "server_version": status.server_version,
        "server_id": status.server_id,
        "store": status.store,
        "compact_revision": status.compact_revision,
        "key_count": status.key_count,
        "started_at": timestamp(status.started_at),
        "limits": {
            "max_key_bytes": limits.max_key_bytes,
            "max_value_bytes": limits.max_value_bytes,
            "default_page_size": limits.default_page_size,
            "max_page_size": limits.max_page_size,
            "default_progress_interval_ms": round(limits.default_progress_interval * 1000),
        },
    }


# --------------------------------------------------------------------------- text


def put_text(result: PutResult) -> str:
    """``created greeting (revision 5)``, ``updated greeting (revision 6, version 2)``."""
    entry = result.entry
    if result.created:
        text = f"created {entry.key} (revision {result.revision}"
    else:
        text = f"updated {entry.key} (revision {result.revision}, version {entry.version}"
    remaining = entry.ttl()
    if remaining is not None:
        text += f", expires in {duration(remaining)}"
    return text + ")"


def delete_text(result: DeleteResult, key: str, *, prefix: bool) -> str:
    """``deleted greeting (revision 7)``, ``deleted 3 keys under app/ (revision 10)``."""
    if result.deleted == 0:
        what = f"under {key!r}" if prefix else key
        return f"nothing deleted {what} (revision {result.revision})"
    if prefix:
        noun = "key" if result.deleted == 1 else "keys"
        return f"deleted {result.deleted} {noun} under {key!r} (revision {result.revision})"
    return f"deleted {key} (revision {result.revision})"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], right: set[int]) -> list[str]:
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = []
    for row in [header, *rows]:
        cells = [
            c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))
        ]
        lines.append("  ".join(cells).rstrip())
    return lines


def list_table(result: ListResult, *, keys_only: bool, now: datetime | None = None) -> list[str]:
    """An aligned table of the listing, then a summary line."""
    now = now or datetime.now(UTC)
    header = ["KEY", "VERSION", "MOD_REV", "TTL"] + ([] if keys_only else ["VALUE"])
    rows = []
    for entry in result.entries:
        row = [entry.key, str(entry.version), str(entry.mod_revision), _ttl(entry, now)]
        if not keys_only:
            row.append(show_value(entry.value))
        rows.append(row)
    lines = _table(header, rows, right={1, 2}) if rows else []
    count = len(result.entries)
    summary = f"({count} key{'' if count == 1 else 's'}"
    if result.truncated:
        summary += f" of {result.count}" if result.count is not None else ", more not shown"
    lines.append(summary + f", revision {result.revision})")
    return lines


def event_text(event: WatchEvent, *, now: datetime | None = None) -> str:
    """``     12  PUT     greeting = hello``; ``     13  DELETE  greeting``."""
    revision = "initial" if event.initial else str(event.revision)
    line = f"{revision:>7}  {event.type.value:<6}  {event.key}"
    if event.type.value == "PUT":
        line += f" = {show_value(event.entry.value)}"
        remaining = event.entry.ttl(now)
        if remaining is not None:
            line += f"  (expires in {duration(remaining)})"
    if event.prev_entry is not None:
        line += f"  (was {show_value(event.prev_entry.value, 30)})"
    return line


def status_text(status: ServerStatus, *, now: datetime | None = None) -> list[str]:
    """The status, one aligned ``name  value`` line per item."""
    now = now or datetime.now(UTC)
    limits = status.limits
    started = "-"
    if status.started_at is not None:
        started = status.started_at.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
        started += f" (up {duration(max(0.0, (now - status.started_at).total_seconds()))})"
    history = "complete" if status.compact_revision == 0 else f"from revision {status.compact_revision}"
    rows = [
        ("server", f"{status.server_version} ({status.server_id})"),
        ("store", status.store),
        ("revision", f"{status.revision} (history {history})"),
        ("keys", str(status.key_count)),
        ("started", started),
        ("max key", f"{limits.max_key_bytes} bytes"),
        ("max value", f"{limits.max_value_bytes} bytes"),
        ("page size", f"{limits.default_page_size} (max {limits.max_page_size})"),
        ("progress", f"every {duration(limits.default_progress_interval)}"),
    ]
    width = max(len(name) for name, _ in rows)
    return [f"{name.ljust(width)}  {value}" for name, value in rows]
