"""The exceptions of kvclient: one hierarchy, mapped from gRPC status codes in one table.

Every error raised by :class:`kvclient.Client` and :class:`kvclient.AsyncClient` is a
:class:`KvError`. ``str(error)`` is the server's message unchanged (or, when the server sent
none, a short default); ``error.code`` is the gRPC status code it came from (``None`` for an
error detected by the client before anything was sent).
"""

from __future__ import annotations

import grpc

__all__ = [
    "ERROR_TABLE",
    "Cancelled",
    "Conflict",
    "DeadlineExceeded",
    "HistoryCompacted",
    "InvalidArgument",
    "KeyNotFound",
    "KvError",
    "PermissionDenied",
    "ResourceExhausted",
    "ServerError",
    "SlowConsumer",
    "Unauthenticated",
    "Unavailable",
    "Unimplemented",
    "error_for_status",
]


class KvError(Exception):
    """The base of every error kvclient raises.

    ``message`` is the server's message (``str(error)`` returns it), ``code`` the gRPC status
    code, or ``None`` when the client itself rejected the call.
    """

    default_message = "kv error"

    def __init__(self, message: str = "", *, code: grpc.StatusCode | None = None) -> None:
        self.message = message or self.default_message
        self.code = code
        super().__init__(self.message)

    def __str__(self) -> str:
        return self.message

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.message!r}, code={self.code})"


class KeyNotFound(KvError, LookupError):
    """The key does not exist, or its TTL has passed (NOT_FOUND)."""

    default_message = "key not found"


class Conflict(KvError):
    """A condition of a write failed and nothing changed (ABORTED, also ALREADY_EXISTS)."""

    default_message = "condition failed"


class InvalidArgument(KvError, ValueError):
    """The request breaks a rule of the contract; the message names the field."""

    default_message = "invalid argument"


class HistoryCompacted(KvError):
    """The revision asked for is no longer retained (OUT_OF_RANGE, or a watch cancelled with
    REASON_COMPACTED). List again and watch from the listing's revision.

    ``compact_revision`` is the oldest revision the server can still deliver, when known.
    """

    default_message = "history compacted"

    def __init__(
        self,
        message: str = "",
        *,
        code: grpc.StatusCode | None = None,
        compact_revision: int | None = None,
    ) -> None:
        super().__init__(message, code=code)
        self.compact_revision = compact_revision


class ResourceExhausted(KvError):
    """A limit of the server is reached (RESOURCE_EXHAUSTED)."""

    default_message = "resource exhausted"


class SlowConsumer(ResourceExhausted):
    """A watch read too slowly for the server and could not be resumed in time."""

    default_message = "watch consumer too slow"


class Unavailable(KvError):
    """The server cannot be reached, is shutting down, or its storage failed (UNAVAILABLE)."""

    default_message = "server unavailable"


class DeadlineExceeded(KvError):
    """The call did not complete within its timeout (DEADLINE_EXCEEDED)."""

    default_message = "deadline exceeded"


class PermissionDenied(KvError):
    """The caller may not do this (PERMISSION_DENIED)."""

    default_message = "permission denied"


class Unauthenticated(KvError):
    """The call carried no valid credentials (UNAUTHENTICATED)."""

    default_message = "unauthenticated"


class Cancelled(KvError):
    """The call was cancelled (CANCELLED)."""

    default_message = "cancelled"


class Unimplemented(KvError):
    """The server does not implement this call (UNIMPLEMENTED)."""

    default_message = "not implemented by the server"


class ServerError(KvError):
    """The server failed (INTERNAL, UNKNOWN, DATA_LOSS, FAILED_PRECONDITION, or any other)."""

    default_message = "server error"


# THE table: gRPC status code -> exception class. Codes missing here become ServerError.
ERROR_TABLE: dict[grpc.StatusCode, type[KvError]] = {
    grpc.StatusCode.NOT_FOUND: KeyNotFound,
    grpc.StatusCode.ABORTED: Conflict,
    grpc.StatusCode.ALREADY_EXISTS: Conflict,
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.OUT_OF_RANGE: HistoryCompacted,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.CANCELLED: Cancelled,
    grpc.StatusCode.UNIMPLEMENTED: Unimplemented,
    grpc.StatusCode.INTERNAL: ServerError,
    grpc.StatusCode.UNKNOWN: ServerError,
    grpc.StatusCode.DATA_LOSS: ServerError,
    grpc.StatusCode.FAILED_PRECONDITION: ServerError,
}


def error_for_status(code: grpc.StatusCode, message: str | None) -> KvError:
    """Return the exception for a gRPC status, keeping the server's message unchanged."""
    cls = ERROR_TABLE.get(code, ServerError)
    return cls(message or "", code=code)
