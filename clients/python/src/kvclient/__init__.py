"""kvclient: the Python client of the kv key-value service.

``Client`` blocks, ``AsyncClient`` is for asyncio; both have the same methods (``put``,
``get``, ``delete``, ``list``, ``watch``, ``status``, ``limits``) with the same arguments,
results and docstrings. Results are frozen dataclasses (``Entry``, ``PutResult``,
``DeleteResult``, ``ListResult``, ``WatchEvent``, ``ServerStatus``); errors are ``KvError``
subclasses mapped from gRPC status codes in one table (``kvclient.errors.ERROR_TABLE``).

Timeouts: every call has one, 10 seconds unless the client or the call sets another
(``timeout=None`` for none). It covers the call with all its retries; for ``list`` it applies to
each page; a watch has none (see below).

Retries (exponential backoff with jitter, ``RetryPolicy``), the rule:

* Reads (``get``, ``list`` pages, ``status``) are retried on UNAVAILABLE (and on CANCELLED,
  which only a server can cause for a unary call: a stopping server cancels the calls in flight).
* Writes (``put``, ``delete``) are retried on those codes only when they are conditional on a
  revision (``if_mod_revision`` or ``if_version``): such a write can never apply twice. If the
  first attempt did apply and only its answer was lost, the retry fails its condition and
  raises ``Conflict``; read the key to tell.
* Every other write, and every other error, is never retried: an ``Unavailable`` (or
  ``Cancelled``) from an unconditional write means it may or may not have been applied.
* A watch resumes by itself, from one past the last revision it delivered, after a dropped
  connection, a server restart, or a cancel for shutdown or a slow consumer, for at most
  ``RetryPolicy.watch_resume_timeout`` seconds without a message; it raises
  ``HistoryCompacted`` when the history it needs is gone.
"""

from kvclient._async import AsyncClient, AsyncWatch
from kvclient._protocol import DEFAULT, DEFAULT_TARGET, DEFAULT_TIMEOUT, VERSION
from kvclient._sync import Client, Watch
from kvclient.errors import (
    Cancelled,
    Conflict,
    DeadlineExceeded,
    HistoryCompacted,
    InvalidArgument,
    KeyNotFound,
    KvError,
    PermissionDenied,
    ResourceExhausted,
    ServerError,
    SlowConsumer,
    Unauthenticated,
    Unavailable,
    Unimplemented,
)
from kvclient.models import (
    DeleteResult,
    Entry,
    EventType,
    Limits,
    ListResult,
    PutResult,
    RetryPolicy,
    ServerStatus,
    Tls,
    WatchEvent,
    WatchProgress,
)

__version__ = VERSION

__all__ = [
    "DEFAULT",
    "DEFAULT_TARGET",
    "DEFAULT_TIMEOUT",
    "AsyncClient",
    "AsyncWatch",
    "Cancelled",
    "Client",
    "Conflict",
    "DeadlineExceeded",
    "DeleteResult",
    "Entry",
    "EventType",
    "HistoryCompacted",
    "InvalidArgument",
    "KeyNotFound",
    "KvError",
    "Limits",
    "ListResult",
    "PermissionDenied",
    "PutResult",
    "ResourceExhausted",
    "RetryPolicy",
    "ServerError",
    "ServerStatus",
    "SlowConsumer",
    "Tls",
    "Unauthenticated",
    "Unavailable",
    "Unimplemented",
    "Watch",
    "WatchEvent",
    "WatchProgress",
    "__version__",
]
