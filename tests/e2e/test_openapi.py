"""docs/openapi/kv.openapi.json: up to date with the protos, valid OpenAPI 3.1, describing every
HTTP binding the gateway publishes, and true of the real gateway: every documented operation and
query parameter is served, and the answers have the documented shapes (no undocumented fields)."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import yaml
from google.protobuf import descriptor_pb2

if TYPE_CHECKING:
    from tests.e2e.conftest import Reply, StartGateway

ROOT = Path(__file__).resolve().parents[2]
DOCUMENT = ROOT / "docs" / "openapi" / "kv.openapi.json"
DESCRIPTOR = ROOT / "build" / "kv.pb"
VERBS = ("get", "put", "post", "delete", "patch")

pytestmark = pytest.mark.gateway


def document() -> Any:
    return json.loads(DOCUMENT.read_text())


def operations() -> list[tuple[str, str, Any]]:
    return [
        (verb, path, operation)
        for path, item in document()["paths"].items()
        for verb, operation in item.items()
        if verb in VERBS
    ]


def test_the_committed_document_is_what_the_generator_writes() -> None:
    done = subprocess.run(  # noqa: S603
        [sys.executable, str(ROOT / "scripts" / "openapi.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_it_is_valid_openapi_3_1() -> None:
    import openapi_spec_validator as validator

    validator.validate(document())
    assert document()["openapi"] == "3.1.0"


def test_every_http_binding_the_gateway_publishes_is_described() -> None:
    config = yaml.safe_load((ROOT / "gateway" / "envoy.yaml").read_text())
    manager = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    transcoder = next(f for f in manager["http_filters"] if f["name"].endswith("grpc_json_transcoder"))
    published = set(transcoder["typed_config"]["services"])
    from google.api import annotations_pb2  # registers the google.api.http option

    option: Any = annotations_pb2.http
    files = descriptor_pb2.FileDescriptorSet.FromString(DESCRIPTOR.read_bytes())
    expected = set()
    for file in files.file:
        for service in file.service:
            if f"{file.package}.{service.name}" not in published:
                continue
            for method in service.method:
                rule = method.options.Extensions[option]
                for binding in [rule, *rule.additional_bindings]:
                    verb = binding.WhichOneof("pattern")
                    template = getattr(binding, verb).replace("=**}", "}").replace("=*}", "}")
                    expected.add((verb, template, f"{file.package}.{service.name}/{method.name}"))
    described = {(verb, path, operation["x-grpc-method"]) for verb, path, operation in operations()}
    assert described == expected
    assert len({operation["operationId"] for _, _, operation in operations()}) == len(expected)


def test_every_reference_resolves() -> None:
    doc = document()
    refs: list[str] = []

    def walk(node: object) -> None:
        if isinstance(node, dict):
            if "$ref" in node:
                refs.append(node["$ref"])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(doc)
    assert refs
    for ref in refs:
        assert ref.startswith("#/components/schemas/"), ref
        assert ref.removeprefix("#/components/schemas/") in doc["components"]["schemas"], ref


# ---------------------------------------------------------------- against the real gateway


def strict(components: Any) -> Any:
    """The components with every described object closed: an undocumented field fails."""
    closed = copy.deepcopy(components)

    def close(node: object) -> None:
        if isinstance(node, dict):
            if node.get("type") == "object" and "properties" in node and "additionalProperties" not in node:
                node["additionalProperties"] = False
            for value in node.values():
                close(value)
        elif isinstance(node, list):
            for value in node:
                close(value)

    close(closed)
    return closed


def sample(schema: Any) -> str:
    """A query parameter value the schema accepts."""
    if "enum" in schema:
        return str(schema["enum"][1 if len(schema["enum"]) > 1 else 0])
    return {"boolean": "true", "integer": "1"}.get(schema.get("type"), "1")


def request_for(verb: str, path: str, operation: Any) -> tuple[str, str | None, dict[str, str]]:
    target = path.replace("{key}", "doc/key")
    content = operation.get("requestBody", {}).get("content", {})
    if "application/json" in content:
        body = {
            "/set": '{"key": "doc/key", "value": "v"}',
            "/put": '{"key": "doc/key", "value": "v"}',
            "/v1/kv:batchPut": '{"puts": [{"key": "doc/key", "value": "v"}]}',
        }.get(
            path,
            '{"key": "doc/", "prefix": true, "start_revision": "1"}' if "watch" in path else '{"value": "v"}',
        )
        return target, body, {"content-type": "application/json"}
    if "*/*" in content:
        return target, "v", {"content-type": "text/plain"}
    return target, None, {}


def test_the_gateway_serves_what_the_document_says(start_gateway: StartGateway) -> None:
    import jsonschema

    gateway = start_gateway()
    doc = document()
    components = strict(doc["components"])

    def check(reply: Reply, operation: Any, body: bytes, what: str) -> None:
        assert reply.status < 500, (what, reply)
        documented = operation["responses"].get(str(reply.status), operation["responses"]["default"])
        content = documented["content"]
        if "*/*" in content:
            return
        schema = {**content["application/json"]["schema"], "components": components}
        jsonschema.Draft202012Validator(schema).validate(json.loads(body))

    # Writes first, then reads, then deletes: every answer is checked against its documented schema.
    order = {"put": 0, "post": 1, "get": 2, "delete": 3}
    for verb, path, operation in sorted(operations(), key=lambda o: (order[o[0]], o[1])):
        target, body, headers = request_for(verb, path, operation)
        if path == "/v1/watch":
            target += "?key=doc/&prefix=true&start_revision=1" if verb == "get" else ""
            with gateway.stream(verb.upper(), target, body) as response:
                assert response.status == 200, (verb, path)
                line = response.readline()
            check_schema = {**operation["responses"]["200"]["content"]["application/json"]["schema"]}
            jsonschema.Draft202012Validator({**check_schema, "components": components}).validate(
                json.loads(line)
            )
            continue
        if path in ("/get", "/local_read", "/delete"):
            target += "?key=doc/key"
        if verb == "delete":
            gateway.put("doc/key", b"v")
        reply = gateway.request(verb.upper(), target, body, headers)
        check(reply, operation, reply.body, f"{verb} {target}")
        assert reply.status in (200, 201), (verb, target, reply)

    # Every documented query parameter is known to the gateway (not "Could not find field").
    for verb, path, operation in operations():
        if path == "/v1/watch":
            continue
        for parameter in operation.get("parameters", []):
            if parameter["in"] != "query" or parameter["name"] == "key":
                continue
            target, body, headers = request_for(verb, path, operation)
            separator = "?key=doc/key&" if path in ("/get", "/local_read", "/delete") else "?"
            target += f"{separator}{parameter['name']}={sample(parameter['schema'])}"
            reply = gateway.request(verb.upper(), target, body, headers)
            check(reply, operation, reply.body, f"{verb} {target}")
            assert b"Could not find field" not in reply.body, (verb, target, reply)
            assert b"Could not resolve" not in reply.body, (verb, target, reply)


def test_the_strict_check_rejects_an_undocumented_field() -> None:
    import jsonschema

    schema = {
        "$ref": "#/components/schemas/kv.v1.GetResponse",
        "components": strict(document()["components"]),
    }
    validator = jsonschema.Draft202012Validator(schema)
    assert validator.is_valid({"header": {"revision": "1"}, "entry": {"key": "k", "version": "1"}})
    assert not validator.is_valid({"header": {"revision": "1"}, "surprise": True})
    assert not validator.is_valid({"header": {"revision": 1}})  # int64 is a JSON string
