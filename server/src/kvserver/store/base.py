"""The storage interface: keys, bytes and revisions. It never sees protobuf or gRPC."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

from kvserver.domain import Entry, Event, KeyRange, KvError, Page, StoreStats, WriteOp, WriteResult

EventListener = Callable[[Sequence[Event]], None]
"""Called on the event loop after each commit with its events, in revision order."""


class Store(Protocol):
    """A transactional key-value store with a revision counter and an event history.

    Writes are applied one after another in submission order, each atomically; a write is
    acknowledged (its awaitable returns) only once it is durable for the store's durability
    mode, and the listeners have seen its events before it is acknowledged. Reads see only
    acknowledged writes. Entries whose deadline has passed are never returned.
    """

    name: str

    @property
    def revision(self) -> int:
        """The revision of the last committed write."""

    @property
    def compact_revision(self) -> int:
        """Events at or below this revision are discarded; 0 means the history is complete."""

    def add_listener(self, listener: EventListener) -> None: ...

    async def get(self, key: str, now_ms: int, *, serializable: bool = False) -> tuple[int, Entry | None]:
        """The key's entry (None if absent or expired) and the revision it was read at.

        `serializable` allows a replicated store to answer from its local copy without a round of
        consensus; a store with one copy ignores it.
        """

    async def write(self, op: WriteOp) -> WriteResult:
        """Apply one write. Raises KeyNotFound or ConditionFailed, and then changes nothing."""

    async def write_many(self, ops: Sequence[WriteOp]) -> list[WriteResult | KvError]:
        """Apply `ops` in order, each on its own as `write` would, and return one outcome per op.

        The ops are not atomic as a group: each gets its own revision, the one `write` would give
        it. An op that fails with a KvError (a failed condition, an absent key, a storage
        failure) gets that error in its place, changes nothing, and the other ops still apply.
        Returns once every applied op is durable and the listeners have seen its events. An empty
        sequence returns an empty list. An exception that is not a KvError propagates. A store
        that does not keep concurrent writes in submission order (etcd) may commit the ops of
        one call in another order, each still atomically.
        """

    async def range(
        self,
        keys: KeyRange,
        *,
        revision: int,
        after: str | None,
        limit: int,
        keys_only: bool,
        now_ms: int,
    ) -> Page:
        """Up to `limit` entries of `keys` as of `revision`, in key order, after key `after`."""

    async def count(self, keys: KeyRange, *, revision: int, now_ms: int) -> int:
        """The number of keys of `keys` that exist at `revision`."""

    async def events(
        self, keys: KeyRange, *, start_revision: int, end_revision: int, limit: int
    ) -> list[Event]:
        """Up to `limit` events of `keys` with start_revision <= revision <= end_revision.

        Raises Compacted if the history starting at `start_revision` is no longer retained.
        """

    async def revision_at(self, time_ms: int) -> int:
        """The last revision committed before `time_ms` (0 if none is retained)."""

    async def next_expiry(self) -> int | None:
        """The earliest deadline of any key, in ms since the epoch, or None."""

    async def stats(self) -> StoreStats: ...

    async def check(self) -> None:
        """Raise StorageFailure if the store cannot serve (used by health checks)."""

    async def close(self) -> None:
        """Finish pending writes and release the storage."""


def write_outcomes(outcomes: Sequence[WriteResult | BaseException]) -> list[WriteResult | KvError]:
    """`write_many`'s result from a gather of writes with return_exceptions: a KvError stays in
    its op's place; any other exception is raised."""
    results: list[WriteResult | KvError] = []
    for outcome in outcomes:
        if isinstance(outcome, KvError) or not isinstance(outcome, BaseException):
            results.append(outcome)
        else:
            raise outcome
    return results
