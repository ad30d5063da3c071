"""One sqlitedict connection used from asyncio: statements are queued to its worker thread and
their rows, or their error, come back through a callback on that thread or a future on the loop."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

from sqlitedict import SqliteDict

from kvserver.domain import StorageFailure

log = logging.getLogger(__name__)
# sqlitedict logs every failed statement with stacks at ERROR level; the store reports the
# failures itself, once, where it can say what they mean.
logging.getLogger("sqlitedict").setLevel(logging.CRITICAL)

# sqlitedict's worker puts this after the last row of every statement that has a result sink.
_END_OF_ROWS = "--no more--"


class _Sink:
    """A result sink that sqlitedict's worker thread feeds: each row, then the end marker.

    `on_end(rows, error)` runs on the worker thread right after the statement, before the worker
    takes its next request: a statement it queues there runs next. The error of the statement is
    recorded on the connection just before the end marker (the worker runs one statement at a
    time), so reading it at the end marker attributes it to this statement. sqlitedict calls the
    reference it was given to reach the sink; the sink is its own reference, so the queued request
    keeps it alive until the worker is done with it.
    """

    __slots__ = ("_connection", "_on_end", "_rows")

    def __init__(self, connection: Any, on_end: Callable[[list[tuple[Any, ...]], Any], None]) -> None:
        self._connection = connection
        self._on_end = on_end
        self._rows: list[tuple[Any, ...]] = []

    def __call__(self) -> _Sink:
        return self

    def put(self, item: Any) -> None:
        if item != _END_OF_ROWS:
            self._rows.append(item)
            return
        with self._connection._lock:
            error, self._connection.exception = self._connection.exception, None
        try:
            self._on_end(self._rows, error)
        except BaseException:  # never into sqlitedict's worker loop: it would end the thread
            log.exception("a sqlite result handler failed")


class _Group:
    """Statements queued back to back whose outcome is handled once, after the last of them ran:
    `on_end(rows of each statement, the first error or None)`, on the worker thread."""

    __slots__ = ("_count", "_error", "_on_end", "_results")

    def __init__(self, count: int, on_end: Callable[[list[list[tuple[Any, ...]]], Any], None]) -> None:
        self._on_end = on_end
        self._results: list[list[tuple[Any, ...]]] = []
        self._error: Any = None
        self._count = count

    def step(self, rows: list[tuple[Any, ...]], error: Any) -> None:
        self._results.append(rows)
        if error is not None and self._error is None:
            self._error = error
        if len(self._results) == self._count:
            self._on_end(self._results, self._error)


def storage_failure(error: Any) -> StorageFailure:
    """sqlitedict's recorded error (an exc_info tuple) as the store's error."""
    return StorageFailure(f"storage error: {error[1]}")


class Connection:
    """One sqlitedict connection used asynchronously."""

    def __init__(self, path: str, *, read_only: bool) -> None:
        self._dict = SqliteDict(
            path,
            tablename="kv",
            flag="r" if read_only else "c",
            journal_mode="WAL",
            autocommit=False,
            encode=bytes,
            decode=bytes,
            outer_stack=False,
        )
        self._worker = self._dict.conn

    @classmethod
    def create(cls, path: str) -> Connection:
        """Open the writer connection, creating the file and its directory if needed."""
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        return cls(path, read_only=False)

    def enqueue(
        self, sql: str, args: Sequence[Any], on_end: Callable[[list[tuple[Any, ...]], Any], None]
    ) -> None:
        """Queue a statement; `on_end(rows, error)` runs on the worker thread once it has run.

        Queued directly rather than through `execute`, which first re-raises any pending error
        of the worker in the caller: that error belongs to the statement whose sink collects it.
        Any thread may call this, the worker thread included.
        """
        sink = _Sink(self._worker, on_end)
        self._worker.reqs.put((sql, tuple(args), sink, None))

    def enqueue_group(
        self,
        statements: Sequence[tuple[str, Sequence[Any]]],
        on_end: Callable[[list[list[tuple[Any, ...]]], Any], None],
    ) -> None:
        """Queue statements back to back with one handler for all of them (see `_Group`)."""
        group = _Group(len(statements), on_end)
        for sql, args in statements:
            self.enqueue(sql, args, group.step)

    def group(
        self, statements: Sequence[tuple[str, Sequence[Any]]]
    ) -> asyncio.Future[list[list[tuple[Any, ...]]]]:
        """Run statements back to back; the rows of each, or the first error, in one callback."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[list[list[tuple[Any, ...]]]] = loop.create_future()
        self.enqueue_group(
            statements, lambda results, error: _resolve_threadsafe(loop, future, results, error)
        )
        return future

    def transaction(self, statements: Sequence[tuple[str, Sequence[Any]]]) -> asyncio.Future[float]:
        """BEGIN IMMEDIATE, the statements, and COMMIT only if none of them failed (else
        ROLLBACK): the worker queues the COMMIT or ROLLBACK itself, right after the last
        statement, so the transaction costs one trip to the worker and back. Resolves to the
        seconds the COMMIT took, or fails with the first error (after the ROLLBACK).

        sqlitedict's worker goes on with the next queued statement after a failed one, so a
        COMMIT queued up front would commit what the batch did before and after its failure.
        """
        loop = asyncio.get_running_loop()
        future: asyncio.Future[float] = loop.create_future()

        def roll_back(error: Any) -> None:
            # The error of the ROLLBACK itself only means that there was no transaction left.
            self.enqueue("ROLLBACK", (), lambda _, __: _resolve_threadsafe(loop, future, None, error))

        def written(_: object, error: Any) -> None:
            if error is not None:
                roll_back(error)
                return
            started = time.perf_counter()

            def committed(_: object, commit_error: Any) -> None:
                if commit_error is not None:
                    roll_back(commit_error)
                else:
                    _resolve_threadsafe(loop, future, time.perf_counter() - started, None)

            self.enqueue("COMMIT", (), committed)

        self.enqueue_group([("BEGIN IMMEDIATE", ()), *statements], written)
        return future

    def submit(self, sql: str, args: Sequence[Any] = ()) -> asyncio.Future[list[tuple[Any, ...]]]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[list[tuple[Any, ...]]] = loop.create_future()
        self.enqueue(sql, args, lambda rows, error: _resolve_threadsafe(loop, future, rows, error))
        return future

    async def query(self, sql: str, args: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        return await self.submit(sql, args)

    def close(self) -> None:
        self._dict.close()


def _resolve_threadsafe(
    loop: asyncio.AbstractEventLoop, future: asyncio.Future[Any], result: Any, error: Any
) -> None:
    with contextlib.suppress(RuntimeError):  # a closed loop: nobody waits any more
        loop.call_soon_threadsafe(_resolve, future, result, error)


def _resolve(future: asyncio.Future[Any], result: Any, error: Any) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(storage_failure(error))
    else:
        future.set_result(result)
