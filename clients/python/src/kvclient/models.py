"""The values kvclient returns and takes: small frozen dataclasses, never protobuf."""

from __future__ import annotations

import enum
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

from kvclient.errors import KvError

__all__ = [
    "DeleteResult",
    "Entry",
    "EventType",
    "Limits",
    "ListResult",
    "PutItem",
    "PutManyResult",
    "PutOutcome",
    "PutResult",
    "RetryPolicy",
    "ServerStatus",
    "Tls",
    "WatchEvent",
    "WatchProgress",
]


@dataclass(frozen=True, slots=True)
class Entry:
    """A key with its value and metadata.

    ``value`` is the stored bytes (empty for an empty value, and for listings made with
    ``keys_only``); ``text`` decodes it as UTF-8. ``expires_at`` is the key's deadline (an
    aware UTC datetime), ``None`` when it never expires. ``content_type`` is the media type the
    value was written with ("" when none was given).
    """

    key: str
    value: bytes
    create_revision: int
    mod_revision: int
    version: int
    expires_at: datetime | None = None
    content_type: str = ""

    @property
    def text(self) -> str:
        """The value decoded as UTF-8 (raises ``UnicodeDecodeError`` for binary values)."""
        return self.value.decode("utf-8")

    def ttl(self, now: datetime | None = None) -> float | None:
        """Seconds until the key expires (0.0 once passed), ``None`` when it never expires."""
        if self.expires_at is None:
            return None
        now = now or datetime.now(UTC)
        return max(0.0, (self.expires_at - now).total_seconds())


@dataclass(frozen=True, slots=True)
class PutResult:
    """The outcome of a put.

    ``revision`` is the revision of the write, ``created`` says whether the key was new, and
    ``entry`` is the key after the write (with the value that was written). ``prev_entry`` is
    the key before the write when ``return_previous`` was asked and the key existed.
    """

    revision: int
    created: bool
    entry: Entry
    prev_entry: Entry | None = None


@dataclass(frozen=True, slots=True)
class PutItem:
    """One put of ``put_many``: the arguments ``put`` takes, for one key.

    ``value`` is ``str`` (stored as its UTF-8 bytes) or bytes; ``ttl`` is seconds (or a
    timedelta), ``None`` for no expiry; the conditions, ``return_previous`` and ``content_type``
    mean what they mean for ``put``.
    """

    key: str
    value: str | bytes = b""
    ttl: float | timedelta | None = None
    if_absent: bool = False
    if_present: bool = False
    if_mod_revision: int | None = None
    if_version: int | None = None
    return_previous: bool = False
    content_type: str | None = None


@dataclass(frozen=True, slots=True)
class PutOutcome:
    """The outcome of one put of ``put_many``: exactly one of ``result`` (the PutResult, when
    the put was applied) and ``error`` (the KvError that kept it from applying, e.g.
    :class:`~kvclient.Conflict` when its condition failed; such a put changed nothing)."""

    key: str
    result: PutResult | None = None
    error: KvError | None = None

    @property
    def ok(self) -> bool:
        """True when the put was applied."""
        return self.error is None

    def unwrap(self) -> PutResult:
        """The PutResult; raises the put's error when it was not applied."""
        if self.error is not None:
            raise self.error
        if self.result is None:
            raise KvError("the outcome has neither a result nor an error")
        return self.result


@dataclass(frozen=True, slots=True)
class PutManyResult:
    """The outcome of ``put_many``: one PutOutcome per item, in the order given.

    Iterating it yields the outcomes. ``revision`` is the store revision after the last call
    (at least the revision of the last applied put). ``applied`` counts the puts that were
    applied, ``failed`` lists the outcomes of those that were not.
    """

    outcomes: tuple[PutOutcome, ...]
    revision: int

    def __iter__(self) -> Iterator[PutOutcome]:
        return iter(self.outcomes)

    def __len__(self) -> int:
        return len(self.outcomes)

    def __getitem__(self, index: int) -> PutOutcome:
        return self.outcomes[index]

    @property
    def applied(self) -> int:
        """The number of puts that were applied."""
        return sum(1 for outcome in self.outcomes if outcome.error is None)

    @property
    def failed(self) -> tuple[PutOutcome, ...]:
        """The outcomes of the puts that were not applied, in order."""
        return tuple(outcome for outcome in self.outcomes if outcome.error is not None)


@dataclass(frozen=True, slots=True)
class DeleteResult:
    """The outcome of a delete.

    ``deleted`` is the number of keys removed, ``revision`` the revision of the last removal
    (or the current revision when nothing was removed), ``prev_entries`` the removed keys in
    key order when ``return_previous`` was asked.
    """

    revision: int
    deleted: int
    prev_entries: tuple[Entry, ...] = ()


@dataclass(frozen=True, slots=True)
class ListResult:
    """A whole listing, every page of it read at one snapshot ``revision``.

    Iterating it yields the entries in key byte order. ``count`` is the number of keys in the
    whole range when ``include_count`` was asked (it can exceed ``len(entries)`` when a
    ``limit`` cut the listing short), otherwise ``None``. ``truncated`` is true when ``limit``
    stopped the walk before the end of the range.
    """

    entries: tuple[Entry, ...]
    revision: int
    count: int | None = None
    truncated: bool = False

    def __iter__(self) -> Iterator[Entry]:
        return iter(self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    def keys(self) -> list[str]:
        """The keys of the listing, in order."""
        return [entry.key for entry in self.entries]


class EventType(enum.Enum):
    """What a watch event is."""

    PUT = "PUT"
    """A put created or replaced the key (also used for the entries of the initial state)."""
    DELETE = "DELETE"
    """A delete removed the key."""
    EXPIRE = "EXPIRE"
    """The key was removed because its TTL passed."""


@dataclass(frozen=True, slots=True)
class WatchEvent:
    """One change of one key, delivered by a watch.

    ``entry`` is the key after the change; for DELETE and EXPIRE it carries only the key and,
    as ``mod_revision``, the revision of the removal. ``prev_entry`` is the key before the change
    when the watch asked for ``include_previous`` and the key existed. ``initial`` marks the
    entries of the initial state (``include_initial_state``), sent as PUT events in key order
    before any change.
    """

    type: EventType
    entry: Entry
    prev_entry: Entry | None = None
    initial: bool = False

    @property
    def key(self) -> str:
        """The key that changed."""
        return self.entry.key

    @property
    def revision(self) -> int:
        """The revision of the change (for an initial entry: of its last change)."""
        return self.entry.mod_revision


@dataclass(frozen=True, slots=True)
class WatchProgress:
    """A progress mark of a watch: every matching event up to ``revision`` has been delivered.

    Yielded only by watches made with ``progress=True``: after the initial state (when asked),
    and whenever the server reports progress while no event arrives.
    """

    revision: int


@dataclass(frozen=True, slots=True)
class Limits:
    """The limits the server enforces (from the Status call)."""

    max_key_bytes: int
    max_value_bytes: int
    default_page_size: int
    max_page_size: int
    default_progress_interval: float
    """Seconds between progress messages of a watch that does not choose its own interval."""


@dataclass(frozen=True, slots=True)
class ServerStatus:
    """What the server reports about itself."""

    revision: int
    server_version: str
    server_id: str
    store: str
    compact_revision: int
    key_count: int
    limits: Limits
    started_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class Tls:
    """TLS settings of a client.

    ``root_certificates`` are the PEM CA certificates that verify the server (``None``: the
    system's roots). ``certificate_chain`` and ``private_key`` (PEM) authenticate the client
    for mutual TLS; give both or neither. ``server_name`` overrides the name the server
    certificate must carry (by default the host of the target).
    """

    root_certificates: bytes | None = None
    certificate_chain: bytes | None = None
    private_key: bytes | None = field(default=None, repr=False)
    server_name: str | None = None

    @classmethod
    def from_files(
        cls,
        ca: str | Path | None = None,
        cert: str | Path | None = None,
        key: str | Path | None = None,
        server_name: str | None = None,
    ) -> Tls:
        """Read the PEM files: ``ca`` (roots), ``cert`` and ``key`` (client identity)."""

        def read(path: str | Path | None) -> bytes | None:
            return None if path is None else Path(path).read_bytes()

        return cls(read(ca), read(cert), read(key), server_name)


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How a client retries.

    A failed attempt is retried after ``initial_backoff * multiplier**n`` seconds, capped at
    ``max_backoff``, with jitter (a random delay between half of that and all of it), at most
    ``max_attempts`` attempts in all, and never past the call's timeout. A watch keeps
    resuming for at most ``watch_resume_timeout`` seconds without receiving a message before
    it raises the last error. Which errors are retried is described in kvclient's module
    documentation ("Retries").
    """

    max_attempts: int = 6
    initial_backoff: float = 0.05
    max_backoff: float = 2.0
    multiplier: float = 2.0
    watch_resume_timeout: float = 30.0

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        if self.initial_backoff < 0 or self.max_backoff < 0 or self.multiplier < 1:
            raise ValueError("backoffs must be >= 0 and multiplier >= 1")
        if self.watch_resume_timeout < 0:
            raise ValueError("watch_resume_timeout must be >= 0")
