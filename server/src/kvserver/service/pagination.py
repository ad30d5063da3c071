"""Opaque, tamper-proof List page tokens (AIP-158).

A token names the snapshot revision of the listing, the last key returned, and a fingerprint of
the request it belongs to, signed with HMAC-SHA256 so that clients cannot forge or alter one.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import secrets
from dataclasses import dataclass

from kvserver.domain import InvalidArgument

_FIELD = "page_token"


@dataclass(frozen=True, slots=True)
class Cursor:
    revision: int
    after: str


class PageTokens:
    def __init__(self, secret: str = "") -> None:
        self._key = secret.encode() if secret else secrets.token_bytes(32)

    def encode(self, cursor: Cursor, request_fingerprint: str) -> str:
        payload = json.dumps([cursor.revision, cursor.after, request_fingerprint], separators=(",", ":"))
        body = payload.encode()
        signature = hmac.new(self._key, body, hashlib.sha256).digest()[:16]
        return _b64(body) + "." + _b64(signature)

    def decode(self, token: str, request_fingerprint: str) -> Cursor:
        try:
            body_text, signature_text = token.split(".")
            body, signature = _unb64(body_text), _unb64(signature_text)
        except (ValueError, binascii.Error):
            raise InvalidArgument(_FIELD, "not a page token issued by this server") from None
        expected = hmac.new(self._key, body, hashlib.sha256).digest()[:16]
        if not hmac.compare_digest(signature, expected):
            raise InvalidArgument(_FIELD, "not a page token issued by this server (or it was altered)")
        revision, after, fingerprint = json.loads(body)
        if fingerprint != request_fingerprint:
            raise InvalidArgument(_FIELD, "the token belongs to a listing with different parameters")
        return Cursor(int(revision), str(after))


def fingerprint(*parts: object) -> str:
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16]


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
