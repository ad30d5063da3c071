"""PUT /kv/{key}: a body that is exactly {"value": <string>} sent as application/json stores the
string; any other body is stored raw, byte for byte, whatever it looks like."""

from __future__ import annotations

import base64
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from tests.e2e.conftest import Gateway

pytestmark = pytest.mark.gateway

JSON = "application/json"

# (content type or None for no header, body, the value stored)
CASES = [
    (JSON, b'{"value": "myvalue"}', b"myvalue"),
    (JSON, b'{"value":""}', b""),
    (JSON, b'  {\n  "value" : "with \\"quotes\\" and \\u00fc"\n}\n', 'with "quotes" and ü'.encode()),
    ("application/json; charset=utf-8", b'{"value": "charset"}', b"charset"),
    ("Application/JSON", b'{"value": "any case"}', b"any case"),
    # Not exactly one member "value" holding a string: raw.
    (JSON, b'{"value": 5}', b'{"value": 5}'),
    (JSON, b'{"value": null}', b'{"value": null}'),
    (JSON, b'{"value": ["a"]}', b'{"value": ["a"]}'),
    (JSON, b'{"value": "v", "ttl": 5}', b'{"value": "v", "ttl": 5}'),
    (JSON, b'{"Value": "v"}', b'{"Value": "v"}'),
    (JSON, b'["value", "v"]', b'["value", "v"]'),
    (JSON, b'"just a string"', b'"just a string"'),
    (JSON, b"{not json", b"{not json"),
    (JSON, b"", b""),
    # Not application/json: raw, even when it is the JSON shape.
    ("text/plain", b'{"value": "myvalue"}', b'{"value": "myvalue"}'),
    ("application/x-www-form-urlencoded", b'{"value": "myvalue"}', b'{"value": "myvalue"}'),
    ("application/json-seq", b'{"value": "myvalue"}', b'{"value": "myvalue"}'),
    (None, b'{"value": "myvalue"}', b'{"value": "myvalue"}'),
    ("application/octet-stream", b"\x00\x01\xfe\xff", b"\x00\x01\xfe\xff"),
    (None, b"plain text", b"plain text"),
]


@pytest.mark.parametrize(("content_type", "body", "stored"), CASES)
def test_put_kv_stores_the_json_string_or_the_raw_body(
    gateway: Gateway, keyspace: str, content_type: str | None, body: bytes, stored: bytes
) -> None:
    key = f"{keyspace}k"
    headers = {"content-type": content_type} if content_type is not None else {}
    reply = gateway.request("PUT", f"/kv/{key}", body, headers)
    assert reply.status == 201, reply
    answer = reply.json()
    assert answer["key"] == key
    assert answer["status"] == "created"
    assert answer["version"] == 1
    assert gateway.stored(key) == stored
    # The answer shows the value as text, empty when it is not UTF-8; GET shows base64 then.
    try:
        text = stored.decode()
    except UnicodeDecodeError:
        assert answer["value"] == ""
        text = "base64:" + base64.b64encode(stored).decode()
    else:
        assert answer["value"] == text
    assert gateway.get_json(f"/kv/{key}") == {"key": key, "value": text, "version": 1}


def test_put_kv_replaces_with_200_and_counts_versions(gateway: Gateway, keyspace: str) -> None:
    key = f"{keyspace}k"
    first = gateway.request("PUT", f"/kv/{key}", b'{"value": "one"}', {"content-type": JSON})
    second = gateway.request("PUT", f"/kv/{key}", b"two", {"content-type": "text/plain"})
    assert (first.status, first.json()["status"], first.json()["version"]) == (201, "created", 1)
    assert (second.status, second.json()["status"], second.json()["version"]) == (200, "updated", 2)
    assert gateway.stored(key) == b"two"
