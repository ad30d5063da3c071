"""Bearer tokens with roles: who may call which kv RPC on which keys.

The tokens come from a TOML file (`--auth-tokens`) that holds only their SHA-256 hashes:

    [[tokens]]
    name = "deploy"                 # shown in logs, never sent by clients
    token_sha256 = "9f86d0..."      # printf %s "$TOKEN" | sha256sum
    role = "read-write"             # or "read-only"
    prefix = "app/"                 # optional: every key the request touches starts with it

A call carries `authorization: Bearer <token>` metadata (over REST, the Authorization header,
which Envoy forwards). `decide` answers for one call, given its full method name, its metadata
and its parsed request: allowed, UNAUTHENTICATED (no token, or one that matches no hash: the
same answer either way) or PERMISSION_DENIED (a read-only token writing, a key outside the
token's prefix). A method missing from `RULES` is denied to every token: fail closed.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import re
import tomllib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from google.protobuf.message import Message

from kv.compat.v1 import compat_pb2
from kv.v1 import kv_pb2
from kvserver.domain import KeyRange

UNAUTHENTICATED_MESSAGE = "missing or invalid credentials"
PERMISSION_DENIED_MESSAGE = "the credentials do not allow this request"

_SHA256_HEX = re.compile(r"[0-9a-f]{64}")
_TOKEN_FIELDS = {"name", "token_sha256", "role", "prefix"}


class AuthConfigError(RuntimeError):
    """The token file cannot be used (kv-server reports it and does not start)."""


class Role(enum.Enum):
    READ_ONLY = "read-only"
    READ_WRITE = "read-write"


class Decision(enum.Enum):
    ALLOWED = "allowed"
    UNAUTHENTICATED = "unauthenticated"
    PERMISSION_DENIED = "permission denied"


@dataclass(frozen=True, slots=True)
class Principal:
    """Who a token stands for."""

    name: str
    role: Role
    prefix: str = ""

    def may_touch(self, keys: KeyRange) -> bool:
        """Whether every key of `keys` starts with the principal's prefix."""
        if not self.prefix:
            return True
        allowed = KeyRange.prefix(self.prefix)
        if keys.start < allowed.start:
            return False
        if allowed.end is None:
            return True
        return keys.end is not None and keys.end <= allowed.end


# The keys a request touches: a list of ranges, () for none (Status, Health).
Scope = Callable[[Any], Sequence[KeyRange]]


@dataclass(frozen=True, slots=True)
class Rule:
    request_type: type[Message]
    write: bool
    scope: Scope


def _key(request: Any) -> Sequence[KeyRange]:
    return [KeyRange.single(request.key)]


def _batch_keys(request: Any) -> Sequence[KeyRange]:
    # Every key of the batch: one key the token may not write refuses the whole call.
    return [KeyRange.single(put.key) for put in request.puts]


def _key_or_prefix(request: Any) -> Sequence[KeyRange]:
    return [KeyRange.prefix(request.key) if request.prefix else KeyRange.single(request.key)]


def _listing(request: Any) -> Sequence[KeyRange]:
    # Every field that names keys must stay inside the prefix (prefix with a range is invalid
    # anyway); a page token is signed over the same query, so it cannot widen it.
    if not request.prefix:
        return [KeyRange(request.start_key, request.end_key or None)]
    ranges = [KeyRange.prefix(request.prefix)]
    if request.start_key or request.end_key:
        ranges.append(KeyRange(request.start_key, request.end_key or None))
    return ranges


def _nothing(request: Any) -> Sequence[KeyRange]:
    return ()


def _everything(request: Any) -> Sequence[KeyRange]:
    return [KeyRange("", None)]


_KV = "/kv.v1.KeyValue/"
_COMPAT = "/kv.compat.v1.CompatService/"

RULES: dict[str, Rule] = {
    _KV + "Get": Rule(kv_pb2.GetRequest, False, _key),
    _KV + "GetValue": Rule(kv_pb2.GetValueRequest, False, _key),
    _KV + "Put": Rule(kv_pb2.PutRequest, True, _key),
    _KV + "PutValue": Rule(kv_pb2.PutValueRequest, True, _key),
    _KV + "BatchPut": Rule(kv_pb2.BatchPutRequest, True, _batch_keys),
    _KV + "Delete": Rule(kv_pb2.DeleteRequest, True, _key_or_prefix),
    _KV + "List": Rule(kv_pb2.ListRequest, False, _listing),
    _KV + "Watch": Rule(kv_pb2.WatchRequest, False, _key_or_prefix),
    # Store-wide numbers (revision, key count, limits), no key or value: any valid token.
    _KV + "Status": Rule(kv_pb2.StatusRequest, False, _nothing),
    _COMPAT + "Set": Rule(compat_pb2.SetRequest, True, _key),
    _COMPAT + "PutKey": Rule(compat_pb2.PutKeyRequest, True, _key),
    _COMPAT + "Get": Rule(compat_pb2.GetRequest, False, _key),
    _COMPAT + "LocalRead": Rule(compat_pb2.LocalReadRequest, False, _key),
    _COMPAT + "Delete": Rule(compat_pb2.DeleteRequest, True, _key),
    # Every key: only for tokens without a prefix (a scoped token lists its prefix with List).
    _COMPAT + "All": Rule(compat_pb2.AllRequest, False, _everything),
    _COMPAT + "Health": Rule(compat_pb2.HealthRequest, False, _nothing),
}


@dataclass(frozen=True, slots=True)
class _Token:
    digest: bytes
    principal: Principal


class TokenAuthority:
    """The configured tokens (as SHA-256 digests) and the decision for each call."""

    def __init__(self, tokens: Iterable[tuple[str, Principal]]) -> None:
        """`tokens`: (SHA-256 of the token as 64 lower-case hex digits, principal)."""
        self._tokens = [_Token(bytes.fromhex(digest), principal) for digest, principal in tokens]

    @property
    def principals(self) -> list[Principal]:
        return [token.principal for token in self._tokens]

    @classmethod
    def from_file(cls, path: str | Path) -> TokenAuthority:
        try:
            with open(path, "rb") as file:
                document = tomllib.load(file)
        except tomllib.TOMLDecodeError as error:
            raise AuthConfigError(f"{path}: not valid TOML: {error}") from None
        return cls.from_document(document, str(path))

    @classmethod
    def from_document(cls, document: dict[str, Any], source: str = "the token file") -> TokenAuthority:
        unknown = set(document) - {"tokens"}
        if unknown:
            raise AuthConfigError(f"{source}: unknown setting(s) {', '.join(sorted(unknown))}")
        tables = document.get("tokens")
        if not isinstance(tables, list) or not tables:
            raise AuthConfigError(f"{source}: no [[tokens]]: every request would be refused")
        tokens: list[tuple[str, Principal]] = []
        for index, table in enumerate(tables, 1):
            tokens.append(_parse_token(table, f"{source}: token {index}"))
        names = [principal.name for _, principal in tokens]
        digests = [digest for digest, _ in tokens]
        for values, what in ((names, "name"), (digests, "token_sha256")):
            duplicates = sorted({value for value in values if values.count(value) > 1})
            if duplicates:
                raise AuthConfigError(f"{source}: the same {what} twice: {duplicates[0]}")
        return cls(tokens)

    def authenticate(self, metadata: Iterable[tuple[str, Any]]) -> Principal | None:
        """The principal of the call's bearer token, None when there is none or it is unknown.

        Every configured digest is compared, in constant time, whatever matches."""
        credentials = [value for key, value in metadata if key.lower() == "authorization"]
        if len(credentials) != 1:
            return None
        value = credentials[0]
        if isinstance(value, bytes):
            value = value.decode("latin-1")
        scheme, _, token = str(value).strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            return None
        digest = hashlib.sha256(token.encode()).digest()
        found: Principal | None = None
        for candidate in self._tokens:
            if hmac.compare_digest(candidate.digest, digest):
                found = candidate.principal
        return found

    def decide(self, method: str, metadata: Iterable[tuple[str, Any]], request: object) -> Decision:
        """The decision for one call; `request` is the parsed request (or a Malformed value,
        for which only the role is checked: the call is refused as INVALID_ARGUMENT anyway)."""
        return self.decide_for(self.authenticate(metadata), method, request)

    @staticmethod
    def decide_for(principal: Principal | None, method: str, request: object) -> Decision:
        if principal is None:
            return Decision.UNAUTHENTICATED
        rule = RULES.get(method)
        if rule is None:
            return Decision.PERMISSION_DENIED
        if rule.write and principal.role is not Role.READ_WRITE:
            return Decision.PERMISSION_DENIED
        if isinstance(request, rule.request_type) and not all(
            principal.may_touch(keys) for keys in rule.scope(request)
        ):
            return Decision.PERMISSION_DENIED
        return Decision.ALLOWED


def _parse_token(table: object, where: str) -> tuple[str, Principal]:
    if not isinstance(table, dict):
        raise AuthConfigError(f"{where}: must be a table")
    unknown = set(table) - _TOKEN_FIELDS
    if unknown:
        raise AuthConfigError(f"{where}: unknown field(s) {', '.join(sorted(unknown))}")
    name, digest, role = table.get("name"), table.get("token_sha256"), table.get("role")
    prefix = table.get("prefix", "")
    if not isinstance(name, str) or not name:
        raise AuthConfigError(f"{where}: `name` must be a non-empty string")
    if not isinstance(digest, str) or not _SHA256_HEX.fullmatch(digest.lower()):
        raise AuthConfigError(
            f"{where} ({name}): `token_sha256` must be 64 hex digits, the SHA-256 of the token "
            "(never the token itself)"
        )
    roles = [known.value for known in Role]
    if role not in roles:
        raise AuthConfigError(f"{where} ({name}): `role` must be one of {', '.join(roles)}")
    if not isinstance(prefix, str):
        raise AuthConfigError(f"{where} ({name}): `prefix` must be a string")
    return digest.lower(), Principal(name, Role(role), prefix)


def load_authority(path: str) -> TokenAuthority | None:
    """The authority of the `--auth-tokens` file; None (no authentication) for an empty path."""
    return TokenAuthority.from_file(path) if path else None
