"""Keys with reserved, unsafe and non-ASCII characters on every REST route that takes a key.

The rule (docs/rest.md, "Keys in URLs"): a key is UTF-8, percent-encoded per RFC 3986.
In a path, encode it as one segment (urllib.parse.quote(key, safe=""), encodeURIComponent);
a "/" may also be sent as itself, except as the key's last character. In a query, percent-encode
it the same way; a "+" there is a space (form encoding), so a plus is %2B. In a JSON body, the key
is a JSON string. Each route is checked both ways: written over REST and read over gRPC, and
written over gRPC and read or deleted over REST.
"""

from __future__ import annotations

import json
import urllib.parse
from collections.abc import Callable
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from tests.e2e.conftest import Gateway, StartGateway

pytestmark = pytest.mark.gateway

KEYS = [
    "plain",
    "a/b/c",
    "a//b",
    "/lead",
    "trail/",
    "//",
    "sp ace",
    " spaces around ",
    "100%",
    "%2F",
    "%41%",
    "a:b",
    "a+b",
    "a#b",
    "a?b",
    "a&b=c",
    "semi;colon",
    "dots/../x/./y",
    ".",
    "..",
    "ü-é-€-日本-😀",
    "tab\tnewline\n",
    "quote\"'",
    "back\\slash",
    "<>{}|^`[]",
    "~!$*()',@",
]


def segment(key: str) -> str:
    """The canonical path encoding: the whole key as one segment, "/" as %2F."""
    return urllib.parse.quote(key, safe="")


def with_slashes(key: str) -> str:
    """The other accepted path encoding: "/" sent as itself."""
    return urllib.parse.quote(key, safe="/")


def query(key: str) -> str:
    return urllib.parse.quote(key, safe="")


def form(key: str) -> str:
    """What HTML forms, curl --data-urlencode and urllib.parse.urlencode send: a space is "+"."""
    return urllib.parse.quote_plus(key, safe="")


PATH_ENCODINGS: dict[str, Callable[[str], str]] = {"segment": segment, "with_slashes": with_slashes}
QUERY_ENCODINGS: dict[str, Callable[[str], str]] = {"percent": query, "form": form}


def keys_for(encoding: str, keyspace: str) -> list[str]:
    keys = [keyspace + key for key in KEYS]
    if encoding == "with_slashes":  # a literal "/" cannot end the key: see test_a_trailing_slash_...
        keys = [key for key in keys if not key.endswith("/")]
    return keys


# ---------------------------------------------------------------- written over REST, read over gRPC


WRITES = {
    "PUT /v1/kv/{key}": lambda gw, encode, key: gw.request(
        "PUT",
        f"/v1/kv/{encode(key)}",
        json.dumps({"value": "v:" + key}),
        {"content-type": "application/json"},
    ),
    "PUT /v1/raw/{key}": lambda gw, encode, key: gw.request(
        "PUT", f"/v1/raw/{encode(key)}", ("v:" + key).encode(), {"content-type": "text/plain"}
    ),
    "PUT /kv/{key}": lambda gw, encode, key: gw.request("PUT", f"/kv/{encode(key)}", ("v:" + key).encode()),
    "PUT /keys/{key}": lambda gw, encode, key: gw.request(
        "PUT", f"/keys/{encode(key)}", ("v:" + key).encode()
    ),
}
BODY_WRITES = ("/set", "/put")


@pytest.mark.parametrize("encoding", PATH_ENCODINGS)
@pytest.mark.parametrize("route", WRITES)
def test_write_through_the_path(gateway: Gateway, keyspace: str, route: str, encoding: str) -> None:
    for key in keys_for(encoding, keyspace):
        reply = WRITES[route](gateway, PATH_ENCODINGS[encoding], key)
        assert reply.status == 201, (key, reply)
        assert gateway.stored(key) == ("v:" + key).encode(), key


@pytest.mark.parametrize("route", BODY_WRITES)
def test_write_with_the_key_in_a_json_body(gateway: Gateway, keyspace: str, route: str) -> None:
    for key in keys_for("segment", keyspace):
        reply = gateway.request("POST", route, json.dumps({"key": key, "value": "v:" + key}))
        assert reply.status == 201, (key, reply)
        assert reply.json()["key"] == key
        assert gateway.stored(key) == ("v:" + key).encode(), key


# ---------------------------------------------------------------- written over gRPC, read over REST


def read_v1_kv(gw: Gateway, encode: Callable[[str], str], key: str) -> str:
    entry = gw.get_json(f"/v1/kv/{encode(key)}")["entry"]
    assert entry["value"] == "v:" + key
    return str(entry["key"])


def read_compat(route: str) -> Callable[[Gateway, Callable[[str], str], str], str]:
    def read(gw: Gateway, encode: Callable[[str], str], key: str) -> str:
        answer = gw.get_json(route.format(key=encode(key)))
        assert answer["value"] == "v:" + key
        return str(answer["key"])

    return read


def read_raw(route: str) -> Callable[[Gateway, Callable[[str], str], str], str]:
    def read(gw: Gateway, encode: Callable[[str], str], key: str) -> str:
        reply = gw.request("GET", route.format(key=encode(key)))
        assert reply.status == 200, (key, reply)
        return reply.body.decode()[2:]  # the value is "v:" + key

    return read


PATH_READS = {
    "GET /v1/kv/{key}": read_v1_kv,
    "GET /v1/raw/{key}": read_raw("/v1/raw/{key}"),
    "GET /kv/{key}": read_compat("/kv/{key}"),
    "GET /keys/{key}": read_raw("/keys/{key}"),
}


def read_list(gw: Gateway, encode: Callable[[str], str], key: str) -> str:
    entries = gw.get_json(f"/v1/kv?prefix={encode(key)}&page_size=1")["entries"]
    return str(entries[0]["key"])


def read_watch(gw: Gateway, encode: Callable[[str], str], key: str) -> str:
    revision = gw.stub.Get(__import__("kv.v1.kv_pb2").v1.kv_pb2.GetRequest(key=key)).entry.mod_revision
    with gw.stream("GET", f"/v1/watch?key={encode(key)}&start_revision={revision}") as response:
        assert response.status == 200
        event = json.loads(response.readline())["events"][0]
    assert event["entry"]["value"] == "v:" + key
    return str(event["entry"]["key"])


QUERY_READS = {
    "GET /get?key=": read_compat("/get?key={key}"),
    "GET /local_read?key=": read_compat("/local_read?key={key}"),
    "GET /v1/kv?prefix=": read_list,
    "GET /v1/watch?key=": read_watch,
}


@pytest.mark.parametrize("encoding", PATH_ENCODINGS)
@pytest.mark.parametrize("route", PATH_READS)
def test_read_through_the_path(gateway: Gateway, keyspace: str, route: str, encoding: str) -> None:
    for key in keys_for(encoding, keyspace):
        gateway.put(key, ("v:" + key).encode())
        assert PATH_READS[route](gateway, PATH_ENCODINGS[encoding], key) == key


@pytest.mark.parametrize("encoding", QUERY_ENCODINGS)
@pytest.mark.parametrize("route", QUERY_READS)
def test_read_through_the_query(gateway: Gateway, keyspace: str, route: str, encoding: str) -> None:
    for key in keys_for("segment", keyspace):
        gateway.put(key, ("v:" + key).encode())
        assert QUERY_READS[route](gateway, QUERY_ENCODINGS[encoding], key) == key


DELETES = {
    "DELETE /v1/kv/{key}": ("/v1/kv/{key}", PATH_ENCODINGS),
    "DELETE /kv/{key}": ("/kv/{key}", PATH_ENCODINGS),
    "DELETE /keys/{key}": ("/keys/{key}", PATH_ENCODINGS),
    "DELETE /delete?key=": ("/delete?key={key}", QUERY_ENCODINGS),
}


@pytest.mark.parametrize("route", DELETES)
def test_delete(gateway: Gateway, keyspace: str, route: str) -> None:
    template, encodings = DELETES[route]
    for name, encode in encodings.items():
        for key in keys_for(name if name == "with_slashes" else "segment", keyspace):
            gateway.put(key, b"v")
            reply = gateway.request("DELETE", template.format(key=encode(key)))
            assert reply.status == 200, (name, key, reply)
            assert gateway.stored(key) is None, (name, key)


# ---------------------------------------------------------------- the edges of the rule


def test_a_plus_in_the_path_is_a_plus_and_in_the_query_a_space(gateway: Gateway, keyspace: str) -> None:
    gateway.put(f"{keyspace}a+b", b"plus")
    gateway.put(f"{keyspace}a b", b"space")
    assert gateway.get_json(f"/kv/{keyspace}a+b")["value"] == "plus"
    assert gateway.get_json(f"/kv/{keyspace}a%20b")["value"] == "space"
    assert gateway.get_json(f"/get?key={keyspace}a+b")["value"] == "space"
    assert gateway.get_json(f"/get?key={keyspace}a%2Bb")["value"] == "plus"
    assert gateway.get_json(f"/get?key={keyspace}a%2bb")["value"] == "plus"


def test_a_trailing_slash_must_be_percent_encoded(gateway: Gateway, keyspace: str) -> None:
    """The transcoder's path template drops a literal trailing "/": "k/" must be sent as "k%2F"."""
    assert gateway.request("PUT", f"/kv/{keyspace}dir%2F", b"encoded").status == 201
    assert gateway.stored(f"{keyspace}dir/") == b"encoded"
    assert gateway.request("PUT", f"/kv/{keyspace}dir/", b"literal").status == 201
    assert gateway.stored(f"{keyspace}dir") == b"literal"
    assert gateway.stored(f"{keyspace}dir/") == b"encoded"


def test_percent_encoded_octets_are_case_insensitive_and_decoded_once(
    gateway: Gateway, keyspace: str
) -> None:
    gateway.put(f"{keyspace}ü/%2F", b"v")
    for path in (f"/v1/raw/{keyspace}%C3%BC%2F%252F", f"/v1/raw/{keyspace}%c3%bc%2f%252F"):
        reply = gateway.request("GET", path)
        assert (reply.status, reply.body) == (200, b"v"), path


def test_the_longest_key_fits_in_a_path_and_one_byte_more_is_400(gateway: Gateway, keyspace: str) -> None:
    longest = keyspace + "€" * ((4096 - len(keyspace)) // 3)
    longest += "x" * (4096 - len(longest.encode()))
    assert len(longest.encode()) == 4096
    assert gateway.request("PUT", f"/kv/{segment(longest)}", b"v").status == 201
    assert gateway.stored(longest) == b"v"
    reply = gateway.request("PUT", f"/kv/{segment(longest + 'x')}", b"v")
    assert reply.status == 400
    assert reply.json()["code"] == 3


def test_invalid_utf8_in_a_key_is_400(gateway: Gateway) -> None:
    for path in ("/kv/%FF%FE", "/get?key=%FF", "/v1/kv/%C3"):
        reply = gateway.request("GET", path)
        assert reply.status == 400, (path, reply)
        assert reply.json()["code"] == 3


def test_delete_with_an_empty_key_and_prefix_deletes_every_key(start_gateway: StartGateway) -> None:
    """The contract's empty prefix (every key) is reachable over REST: docs/rest.md warns of it."""
    gateway = start_gateway()
    for key in ("a", "b/c", "z"):
        gateway.put(key, b"v")
    assert gateway.request("DELETE", "/v1/kv/?prefix=false").status == 400  # an empty key alone
    reply = gateway.request("DELETE", "/v1/kv?prefix=true")
    assert (reply.status, reply.json()["deleted"]) == (200, "3")
    assert gateway.get_json("/v1/status")["key_count"] == "0"
