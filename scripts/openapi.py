"""Write the OpenAPI 3.1 description of kv's REST API, generated from the protos.

The REST API is what Envoy's gRPC-JSON transcoder makes of the `google.api.http` annotations of
the services that gateway/envoy.yaml publishes. This script reads the same descriptor set the
gateway loads (build/kv.pb, from `make descriptor`) and describes every binding: the path (a
`{key=**}` variable may hold slashes), the query parameters (the request fields that are neither
in the path nor in the body), the body, the answer, and errors as google.rpc.Status. Schemas
follow the proto3 JSON mapping as the gateway prints it (proto field names, 64-bit integers as
strings, bytes as base64, enums by name, Timestamps as RFC 3339 strings); descriptions are the
proto comments.

    python scripts/openapi.py            # write docs/openapi/kv.openapi.json
    python scripts/openapi.py --check    # exit 1 if the committed document is not what it would write
"""

from __future__ import annotations

import argparse
import difflib
import json
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import yaml
from google.api import annotations_pb2, http_pb2
from google.protobuf import descriptor_pb2

ROOT = Path(__file__).resolve().parent.parent
DESCRIPTOR = ROOT / "build" / "kv.pb"
GATEWAY_CONFIG = ROOT / "gateway" / "envoy.yaml"
OUTPUT = ROOT / "docs" / "openapi" / "kv.openapi.json"

Schema = dict[str, Any]
F = descriptor_pb2.FieldDescriptorProto

# The RPCs that answer 201 Created when they created the key (kv-server's x-kv-created header,
# turned into the status by the gateway's Lua filter). Checked against the descriptor.
CREATING_METHODS = {
    "kv.v1.KeyValue.Put",
    "kv.v1.KeyValue.PutValue",
    "kv.compat.v1.CompatService.Set",
    "kv.compat.v1.CompatService.PutKey",
}
HTTP_BODY = ".google.api.HttpBody"
# The google.api.http option (typed loosely by the protobuf stubs).
HTTP_OPTION: Any = annotations_pb2.http
RAW_BODY: Schema = {"schema": {"type": "string", "format": "binary"}}
# A raw response body is whatever bytes the value holds, with its own content type: in OpenAPI
# 3.1 such content has no schema (a JSON value would fail `type: string`).
RAW_RESPONSE: Schema = {}
# google.api.HttpBody responses whose content is known: every pair as one JSON object.
JSON_BODY_RESPONSES: dict[str, Schema] = {
    "kv.compat.v1.CompatService.All": {
        "application/json": {"schema": {"type": "object", "additionalProperties": {"type": "string"}}}
    },
}
STATUS_REF = "#/components/schemas/google.rpc.Status"

_SCALARS: dict[int, Schema] = {
    F.TYPE_DOUBLE: {"type": "number", "format": "double"},
    F.TYPE_FLOAT: {"type": "number", "format": "float"},
    F.TYPE_INT64: {"type": "string", "format": "int64"},
    F.TYPE_SFIXED64: {"type": "string", "format": "int64"},
    F.TYPE_SINT64: {"type": "string", "format": "int64"},
    F.TYPE_UINT64: {"type": "string", "format": "uint64"},
    F.TYPE_FIXED64: {"type": "string", "format": "uint64"},
    F.TYPE_INT32: {"type": "integer", "format": "int32"},
    F.TYPE_SFIXED32: {"type": "integer", "format": "int32"},
    F.TYPE_SINT32: {"type": "integer", "format": "int32"},
    F.TYPE_UINT32: {"type": "integer", "format": "int64", "minimum": 0, "maximum": 4294967295},
    F.TYPE_FIXED32: {"type": "integer", "format": "int64", "minimum": 0, "maximum": 4294967295},
    F.TYPE_BOOL: {"type": "boolean"},
    F.TYPE_STRING: {"type": "string"},
    F.TYPE_BYTES: {"type": "string", "format": "byte", "description": "Base64."},
}

# Well-known types have their own JSON forms.
_WELL_KNOWN: dict[str, Schema] = {
    ".google.protobuf.Timestamp": {"type": "string", "format": "date-time"},
    ".google.protobuf.Duration": {"type": "string", "pattern": r"^-?[0-9]+(\.[0-9]+)?s$"},
    ".google.protobuf.FieldMask": {"type": "string"},
    ".google.protobuf.Struct": {"type": "object"},
    ".google.protobuf.Value": {},
    ".google.protobuf.ListValue": {"type": "array"},
    ".google.protobuf.Empty": {"type": "object"},
    ".google.protobuf.Any": {
        "type": "object",
        "properties": {"@type": {"type": "string"}},
        "required": ["@type"],
        "additionalProperties": True,
    },
    ".google.protobuf.DoubleValue": {"type": ["number", "null"]},
    ".google.protobuf.FloatValue": {"type": ["number", "null"]},
    ".google.protobuf.Int64Value": {"type": ["string", "null"], "format": "int64"},
    ".google.protobuf.UInt64Value": {"type": ["string", "null"], "format": "uint64"},
    ".google.protobuf.Int32Value": {"type": ["integer", "null"], "format": "int32"},
    ".google.protobuf.UInt32Value": {"type": ["integer", "null"], "minimum": 0},
    ".google.protobuf.BoolValue": {"type": ["boolean", "null"]},
    ".google.protobuf.StringValue": {"type": ["string", "null"]},
    ".google.protobuf.BytesValue": {"type": ["string", "null"], "format": "byte"},
}

_STATUS_SCHEMA: Schema = {
    "type": "object",
    "description": "An error, as google.rpc.Status in JSON: the same shape whether kv-server or "
    "the gateway answered.",
    "properties": {
        "code": {
            "type": "integer",
            "format": "int32",
            "description": "The gRPC status code: 3 INVALID_ARGUMENT, 5 NOT_FOUND, 8 RESOURCE_EXHAUSTED, "
            "10 ABORTED, 14 UNAVAILABLE, ...",
        },
        "message": {"type": "string", "description": "What went wrong, in English."},
        "details": {"type": "array", "items": _WELL_KNOWN[".google.protobuf.Any"]},
    },
    "required": ["code", "message", "details"],
}


@dataclass(frozen=True)
class Message:
    full_name: str  # without the leading dot
    proto: descriptor_pb2.DescriptorProto
    comment: str
    field_comments: dict[str, str]
    oneof_comments: dict[str, str]


@dataclass(frozen=True)
class Binding:
    verb: str
    template: str
    body: str
    response_body: str


class Descriptors:
    """Messages, enums and comments of a FileDescriptorSet, by full name."""

    def __init__(self, files: descriptor_pb2.FileDescriptorSet) -> None:
        self.files = list(files.file)
        self.messages: dict[str, Message] = {}
        self.enums: dict[str, tuple[descriptor_pb2.EnumDescriptorProto, str]] = {}
        for file in self.files:
            comments = {
                tuple(location.path): clean_comment(location.leading_comments)
                for location in file.source_code_info.location
            }
            for index, message in enumerate(file.message_type):
                self._add_message(file.package, message, (4, index), comments)
            for index, enum in enumerate(file.enum_type):
                self.enums[f".{file.package}.{enum.name}"] = (enum, comments.get((5, index), ""))

    def _add_message(
        self,
        scope: str,
        message: descriptor_pb2.DescriptorProto,
        path: tuple[int, ...],
        comments: dict[tuple[int, ...], str],
    ) -> None:
        full_name = f"{scope}.{message.name}"
        field_comments = {
            field.name: comments.get((*path, 2, index), "") for index, field in enumerate(message.field)
        }
        oneof_comments = {
            oneof.name: comments.get((*path, 8, index), "") for index, oneof in enumerate(message.oneof_decl)
        }
        self.messages[f".{full_name}"] = Message(
            full_name, message, comments.get(path, ""), field_comments, oneof_comments
        )
        for index, nested in enumerate(message.nested_type):
            self._add_message(full_name, nested, (*path, 3, index), comments)
        for index, enum in enumerate(message.enum_type):
            self.enums[f".{full_name}.{enum.name}"] = (enum, comments.get((*path, 4, index), ""))

    def services(self) -> Iterator[tuple[str, descriptor_pb2.FileDescriptorProto, int]]:
        for file in self.files:
            for index, service in enumerate(file.service):
                yield f"{file.package}.{service.name}", file, index


def clean_comment(text: str) -> str:
    """A proto comment as one paragraph per blank-line-separated block."""
    paragraphs = [
        " ".join(line.strip() for line in block.splitlines()) for block in text.strip().split("\n\n")
    ]
    return "\n\n".join(paragraph for paragraph in paragraphs if paragraph)


def first_sentence(text: str) -> str:
    match = re.match(r"(.+?\.)(\s|$)", text.replace("\n", " "))
    return match.group(1) if match else text


class Generator:
    def __init__(self, descriptors: Descriptors) -> None:
        self.descriptors = descriptors
        self.schemas: dict[str, Schema] = {}

    # ------------------------------------------------------------------ schemas

    def ref(self, type_name: str) -> Schema:
        """A reference to a message's schema, adding it (and what it uses) to the components."""
        if type_name in _WELL_KNOWN:
            return dict(_WELL_KNOWN[type_name])
        message = self.descriptors.messages[type_name]
        if message.full_name not in self.schemas:
            self.schemas[message.full_name] = {}  # placeholder: recursion stops here
            self.schemas[message.full_name] = self.message_schema(message, exclude=())
        return {"$ref": f"#/components/schemas/{message.full_name}"}

    def message_schema(self, message: Message, exclude: tuple[str, ...]) -> Schema:
        properties = {}
        oneofs: dict[int, list[str]] = {}
        for field in message.proto.field:
            if field.name in exclude:
                continue
            property_schema = self.field_schema(field)
            if field.HasField("oneof_index") and not field.proto3_optional:
                oneofs.setdefault(field.oneof_index, []).append(field.name)
            comment = " ".join(
                text
                for text in (
                    message.field_comments.get(field.name, ""),
                    property_schema.get("description", ""),
                )
                if text
            )
            properties[field.name] = (
                {**property_schema, "description": comment} if comment else property_schema
            )
        notes = [message.comment] if message.comment else []
        for index, members in sorted(oneofs.items()):
            oneof = message.proto.oneof_decl[index].name
            listed = ", ".join(f"`{member}`" for member in members)
            notes.append(
                f"{message.oneof_comments.get(oneof, '')} At most one of {listed} (oneof `{oneof}`).".strip()
            )
        schema: Schema = {"type": "object"}
        if notes:
            schema["description"] = "\n\n".join(notes)
        schema["properties"] = properties
        return schema

    def field_schema(self, field: descriptor_pb2.FieldDescriptorProto) -> Schema:
        if field.type == F.TYPE_MESSAGE:
            entry = self.descriptors.messages.get(field.type_name)
            if entry is not None and entry.proto.options.map_entry:
                value = next(f for f in entry.proto.field if f.name == "value")
                return {"type": "object", "additionalProperties": self.field_schema(value)}
            item = self.ref(field.type_name)
        elif field.type == F.TYPE_ENUM:
            enum, comment = self.descriptors.enums[field.type_name]
            item = {"type": "string", "enum": [value.name for value in enum.value]}
            if comment:
                item["description"] = comment
        else:
            item = dict(_SCALARS[field.type])
        if field.label == F.LABEL_REPEATED:
            return {"type": "array", "items": item}
        return item

    # ------------------------------------------------------------------ operations

    def query_parameters(self, message: Message, exclude: set[str], prefix: str = "") -> list[Schema]:
        """Every field left for the query, nested messages flattened with dots (`a.b`)."""
        parameters = []
        for field in message.proto.field:
            if prefix + field.name in exclude:
                continue
            is_message = field.type == F.TYPE_MESSAGE and field.type_name not in _WELL_KNOWN
            if is_message and field.label != F.LABEL_REPEATED:
                nested = self.descriptors.messages[field.type_name]
                if not nested.proto.options.map_entry and nested.full_name != message.full_name:
                    parameters += self.query_parameters(nested, exclude, f"{prefix}{field.name}.")
                continue
            if is_message:
                continue  # repeated messages cannot be given in a query
            schema = self.field_schema(field)
            parameter: Schema = {"name": prefix + field.name, "in": "query", "schema": schema}
            comment = message.field_comments.get(field.name, "")
            if comment:
                parameter["description"] = comment
            if field.label == F.LABEL_REPEATED:
                parameter["explode"] = True
            parameters.append(parameter)
        return parameters

    def operation(
        self,
        service: str,
        method: descriptor_pb2.MethodDescriptorProto,
        comment: str,
        binding: Binding,
        operation_id: str,
    ) -> tuple[str, Schema]:
        request = self.descriptors.messages[method.input_type]
        path, variables = openapi_path(binding.template)
        in_path = {name for name, _ in variables}
        operation: Schema = {"tags": [service.rsplit(".", 1)[1]], "operationId": operation_id}
        if comment:
            operation["summary"] = first_sentence(comment)
            operation["description"] = comment
        operation["x-grpc-method"] = f"{service}/{method.name}"
        parameters = [self.path_parameter(request, name, pattern) for name, pattern in variables]
        if binding.body != "*":
            exclude = in_path | ({binding.body} if binding.body else set())
            parameters += self.query_parameters(request, exclude)
        if parameters:
            operation["parameters"] = parameters
        if binding.body == "*":
            top_level = {name.split(".")[0] for name in in_path}
            if top_level:
                schema = self.message_schema(request, exclude=tuple(sorted(top_level)))
            else:
                schema = self.ref(method.input_type)
            operation["requestBody"] = {"content": {"application/json": {"schema": schema}}}
        elif binding.body:
            field = next(f for f in request.proto.field if f.name == binding.body)
            description = request.field_comments.get(field.name, "")
            if field.type_name == HTTP_BODY:
                content = {"*/*": RAW_BODY}
                description = (description + " The raw request body; its Content-Type goes with it.").strip()
            else:
                content = {"application/json": {"schema": self.field_schema(field)}}
            operation["requestBody"] = {"description": description, "content": content}
        operation["responses"] = self.responses(service, method, binding)
        return path, operation

    def path_parameter(self, request: Message, name: str, pattern: str) -> Schema:
        comment = request.field_comments.get(name.split(".")[-1], "")
        if pattern == "**":
            rule = (
                "Percent-encoded (RFC 3986, the whole key as one segment: `/` as %2F); a `/` may "
                "also be sent as itself except as the last character (the template is "
                f"`{{{name}=**}}`)."
            )
        else:
            rule = "Percent-encoded (RFC 3986); one path segment."
        return {
            "name": name,
            "in": "path",
            "required": True,
            "description": f"{comment} {rule}".strip(),
            "schema": {"type": "string"},
        }

    def responses(
        self, service: str, method: descriptor_pb2.MethodDescriptorProto, binding: Binding
    ) -> Schema:
        output = method.output_type
        if binding.response_body:
            message = self.descriptors.messages[output]
            field = next(f for f in message.proto.field if f.name == binding.response_body)
            content = {"application/json": {"schema": self.field_schema(field)}}
        elif output == HTTP_BODY:
            content = JSON_BODY_RESPONSES.get(f"{service}.{method.name}", {"*/*": RAW_RESPONSE})
        else:
            content = {"application/json": {"schema": self.ref(output)}}
        if method.server_streaming:
            description = (
                "A stream of newline-delimited JSON: one message per line, for as long as the "
                "client reads. An error after the first line arrives as the last message."
            )
            ok: Schema = {"description": description, "content": content}
        else:
            ok = {"description": "OK.", "content": content}
        responses: Schema = {}
        if f"{service}.{method.name}" in CREATING_METHODS:
            responses["200"] = {**ok, "description": "The key existed: its value was replaced."}
            responses["201"] = {**ok, "description": "The key was created."}
        else:
            responses["200"] = ok
        responses["default"] = {
            "description": "An error: the HTTP status of its gRPC code (400, 404, 409, 413, 429, 503, ...).",
            "content": {"application/json": {"schema": {"$ref": STATUS_REF}}},
        }
        return responses

    # ------------------------------------------------------------------ document

    def document(self, services: list[str]) -> Schema:
        paths: dict[str, Schema] = {}
        found = {name: (file, index) for name, file, index in self.descriptors.services()}
        missing = [name for name in services if name not in found]
        if missing:
            raise SystemExit(f"openapi: the gateway publishes {missing}, which the descriptor set lacks")
        methods = {
            f"{name}.{m.name}" for name in services for m in found[name][0].service[found[name][1]].method
        }
        if not methods >= CREATING_METHODS:
            raise SystemExit(f"openapi: CREATING_METHODS names unknown methods {CREATING_METHODS - methods}")
        tags = []
        for name in services:
            file, index = found[name]
            service = file.service[index]
            locations = {
                tuple(loc.path): clean_comment(loc.leading_comments) for loc in file.source_code_info.location
            }
            tags.append({"name": service.name, "description": locations.get((6, index), "")})
            for method_index, method in enumerate(service.method):
                comment = locations.get((6, index, 2, method_index), "")
                for number, binding in enumerate(bindings(method), start=1):
                    operation_id = f"{service.name}_{method.name}" + (f"_{number}" if number > 1 else "")
                    path, operation = self.operation(name, method, comment, binding, operation_id)
                    if binding.verb in paths.setdefault(path, {}):
                        raise SystemExit(f"openapi: two bindings for {binding.verb.upper()} {path}")
                    paths[path][binding.verb] = operation
        self.schemas["google.rpc.Status"] = _STATUS_SCHEMA
        return {
            "openapi": "3.1.0",
            "info": {
                "title": "kv REST API",
                "version": "v1",
                "description": "kv's REST API: Envoy's gRPC-JSON transcoder in front of kv-server "
                "(gateway/envoy.yaml). Generated from the protos by scripts/openapi.py; docs/rest.md "
                "is the guide.",
            },
            "servers": [{"url": "http://localhost:8080", "description": "make run"}],
            "tags": tags,
            "paths": {path: paths[path] for path in sorted(paths)},
            "components": {"schemas": {name: self.schemas[name] for name in sorted(self.schemas)}},
        }


def bindings(method: descriptor_pb2.MethodDescriptorProto) -> list[Binding]:
    if not method.options.HasExtension(HTTP_OPTION):
        return []
    rule = cast(http_pb2.HttpRule, method.options.Extensions[HTTP_OPTION])
    return [binding_of(rule)] + [binding_of(extra) for extra in rule.additional_bindings]


def binding_of(rule: http_pb2.HttpRule) -> Binding:
    verb = rule.WhichOneof("pattern")
    if verb is None:
        raise SystemExit("openapi: an HttpRule without a pattern")
    if verb == "custom":
        return Binding(rule.custom.kind.lower(), rule.custom.path, rule.body, rule.response_body)
    return Binding(verb, getattr(rule, verb), rule.body, rule.response_body)


_VARIABLE = re.compile(r"\{([^}=]+)(?:=([^}]*))?\}")


def openapi_path(template: str) -> tuple[str, list[tuple[str, str]]]:
    """`/v1/kv/{key=**}` -> (`/v1/kv/{key}`, [("key", "**")])."""
    variables = [(match.group(1), match.group(2) or "*") for match in _VARIABLE.finditer(template)]
    return _VARIABLE.sub(lambda match: "{" + match.group(1) + "}", template), variables


def published_services(config: Path) -> list[str]:
    """The services gateway/envoy.yaml's transcoder publishes."""
    document = yaml.safe_load(config.read_text())
    for listener in document["static_resources"]["listeners"]:
        for chain in listener["filter_chains"]:
            for network_filter in chain["filters"]:
                for http_filter in network_filter["typed_config"].get("http_filters", []):
                    if http_filter["name"] == "envoy.filters.http.grpc_json_transcoder":
                        return list(http_filter["typed_config"]["services"])
    raise SystemExit(f"openapi: no grpc_json_transcoder in {config}")


def render(descriptor: Path, config: Path) -> str:
    files = descriptor_pb2.FileDescriptorSet.FromString(descriptor.read_bytes())
    document = Generator(Descriptors(files)).document(published_services(config))
    return json.dumps(document, indent=2, ensure_ascii=False) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--check", action="store_true", help="only report whether the document is up to date")
    parser.add_argument(
        "--descriptor", type=Path, default=DESCRIPTOR, help="the descriptor set (build/kv.pb)"
    )
    parser.add_argument("--gateway", type=Path, default=GATEWAY_CONFIG, help="the Envoy configuration")
    parser.add_argument("--out", type=Path, default=OUTPUT, help="the document to write or check")
    args = parser.parse_args()
    if not args.descriptor.exists():
        print(f"openapi: {args.descriptor} is missing: run `make descriptor`", file=sys.stderr)
        return 2
    text = render(args.descriptor, args.gateway)
    if args.check:
        current = args.out.read_text() if args.out.exists() else ""
        if current != text:
            diff = difflib.unified_diff(
                current.splitlines(), text.splitlines(), str(args.out), "generated", lineterm="", n=1
            )
            print(f"{args.out} is stale; run `make generate`. Differences:", *list(diff)[:40], sep="\n")
            return 1
        print(f"{args.out} is up to date.")
        return 0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(f"Wrote {args.out}.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
