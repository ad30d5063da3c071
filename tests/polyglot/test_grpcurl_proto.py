"""grpcurl from the contract's files instead of server reflection: what a client in a language
without reflection support does. tests/integration/test_grpcurl.py covers every RPC through
reflection; these tests show that proto/ alone (plus google/api from googleapis-common-protos) is
enough to call the server, that a descriptor set built by protoc or buf is enough too, and that the
server serves exactly the services and messages that proto/ declares."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import google.api
import pytest
from google.protobuf import descriptor_pb2

from kvtest import BIN, ServerProcess

ROOT = Path(__file__).resolve().parents[2]
PROTO_ROOT = ROOT / "proto"
GOOGLEAPIS_INCLUDE = Path(next(iter(google.api.__path__))).parent.parent
GRPCURL = str(BIN / "grpcurl")
TIMEOUT_S = 20.0


def proto_files() -> list[str]:
    return sorted(str(path.relative_to(PROTO_ROOT)) for path in PROTO_ROOT.rglob("*.proto"))


def source_flags() -> list[str]:
    """`-import-path proto -import-path <googleapis> -proto kv/v1/kv.proto ...`: no reflection."""
    flags = ["-import-path", str(PROTO_ROOT), "-import-path", str(GOOGLEAPIS_INCLUDE)]
    for name in proto_files():
        flags += ["-proto", name]
    return flags


def grpcurl(*args: str, data: object = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    """`grpcurl [-d JSON] args...` (args: flags, then the address and method if any)."""
    command = [GRPCURL, *(["-d", json.dumps(data)] if data is not None else []), *args]
    result = subprocess.run(  # noqa: S603
        command, capture_output=True, text=True, timeout=TIMEOUT_S, check=False, stdin=subprocess.DEVNULL
    )
    if check:
        assert result.returncode == 0, f"{command}: {result.returncode}\n{result.stdout}\n{result.stderr}"
    return result


def call(flags: list[str], server: ServerProcess, method: str, data: object) -> Any:
    """One unary call, described by `flags` (proto files or a protoset) instead of reflection."""
    output = grpcurl("-plaintext", *flags, server.address, method, data=data).stdout
    return json.loads(output)


def json_objects(text: str) -> list[Any]:
    decoder = json.JSONDecoder()
    objects: list[Any] = []
    position = 0
    for _ in range(10_000):
        while position < len(text) and text[position].isspace():
            position += 1
        if position >= len(text):
            return objects
        parsed, position = decoder.raw_decode(text, position)
        objects.append(parsed)
    raise AssertionError("too many objects")


def contract() -> list[descriptor_pb2.FileDescriptorProto]:
    """The files of proto/, compiled by protoc: the ground truth, independent of grpcurl."""
    result = subprocess.run(  # noqa: S603
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"-I{PROTO_ROOT}",
            f"-I{GOOGLEAPIS_INCLUDE}",
            "--descriptor_set_out=/dev/stdout",
            *proto_files(),
        ],
        capture_output=True,
        timeout=TIMEOUT_S,
        check=True,
    )
    return list(descriptor_pb2.FileDescriptorSet.FromString(result.stdout).file)


def declared_services() -> dict[str, list[str]]:
    """Every service of proto/ with its methods."""
    return {
        f"{file.package}.{service.name}": sorted(method.name for method in service.method)
        for file in contract()
        for service in file.service
    }


def normalized(file: descriptor_pb2.FileDescriptorProto) -> descriptor_pb2.FileDescriptorProto:
    """The file without what reflection leaves out: comments (source info) and the json_name that
    protoc fills in (every client derives it from the field name the same way)."""
    copy = descriptor_pb2.FileDescriptorProto()
    copy.CopyFrom(file)
    copy.ClearField("source_code_info")
    messages = list(copy.message_type)
    for _ in range(10_000):
        if not messages:
            break
        message = messages.pop()
        for field in message.field:
            field.ClearField("json_name")
        messages.extend(message.nested_type)
    return copy


def without_comments(text: str) -> str:
    """grpcurl's `describe` output without the comments (reflection carries none)."""
    return "\n".join(line for line in text.splitlines() if not line.strip().startswith("//"))


def test_the_contract_files_describe_every_service_without_a_server() -> None:
    declared = declared_services()
    assert "kv.v1.KeyValue" in declared
    listed = grpcurl(*source_flags(), "list").stdout.split()
    assert sorted(listed) == sorted(declared)
    for service, methods in declared.items():
        assert grpcurl(*source_flags(), "list", service).stdout.split() == [f"{service}.{m}" for m in methods]
    # The comments of the contract (its semantics) come along with the proto files.
    described = grpcurl(*source_flags(), "describe", "kv.v1.WatchRequest.start_revision").stdout
    assert "start_revision is the first revision to deliver" in described


def test_the_server_serves_exactly_the_contract_in_proto(kv_server: ServerProcess, tmp_path: Path) -> None:
    """Reflection (what the running server says) against proto/ (what clients are generated from):
    the same services with the same methods, and the same files, message by message and field by
    field (grpcurl -protoset-out saves the descriptors the server sent)."""
    declared = {file.name: file for file in contract()}
    served = set(grpcurl("-plaintext", kv_server.address, "list").stdout.split())
    for service in declared_services():
        assert service in served, f"{service} is declared in proto/ but not served"
        from_server = grpcurl("-plaintext", kv_server.address, "describe", service).stdout
        from_files = grpcurl(*source_flags(), "describe", service).stdout
        assert without_comments(from_server) == without_comments(from_files), service

        protoset = tmp_path / f"{service}.binpb"
        grpcurl("-plaintext", "-protoset-out", str(protoset), kv_server.address, "describe", service)
        files = descriptor_pb2.FileDescriptorSet.FromString(protoset.read_bytes()).file
        ours = [file for file in files if file.name in declared]
        assert ours, f"reflection sent none of the files of proto/ for {service}"
        for file in ours:
            assert normalized(file) == normalized(declared[file.name]), f"{file.name} differs from proto/"


def test_every_kind_of_call_from_the_proto_files(kv_server: ServerProcess) -> None:
    flags = source_flags()
    put = call(flags, kv_server, "kv.v1.KeyValue/Put", {"key": "files/raw", "value_bytes": "/wD+"})
    revision = int(put["header"]["revision"])  # int64 is a JSON string
    assert put["created"] is True
    got = call(flags, kv_server, "kv.v1.KeyValue/Get", {"key": "files/raw"})
    assert got["entry"]["valueBytes"] == "/wD+"  # bytes are base64; invalid UTF-8 stays bytes
    call(flags, kv_server, "kv.v1.KeyValue/Put", {"key": "files/text", "value": "ünïcode"})
    listing = call(flags, kv_server, "kv.v1.KeyValue/List", {"prefix": "files/", "include_count": True})
    assert [entry["key"] for entry in listing["entries"]] == ["files/raw", "files/text"]
    assert listing["count"] == "2"
    status = call(flags, kv_server, "kv.v1.KeyValue/Status", {})
    assert int(status["header"]["revision"]) == revision + 1

    # A server stream: every event from start_revision, then the stream stays open until -max-time.
    watch = grpcurl(
        "-plaintext",
        "-max-time",
        "2",
        *flags,
        kv_server.address,
        "kv.v1.KeyValue/Watch",
        data={"key": "files/", "prefix": True, "start_revision": revision},
        check=False,
    )
    assert "DeadlineExceeded" in watch.stderr, watch.stderr
    events = [event for message in json_objects(watch.stdout) for event in message.get("events", [])]
    assert [(e["type"], e["entry"]["key"]) for e in events] == [
        ("TYPE_PUT", "files/raw"),
        ("TYPE_PUT", "files/text"),
    ]
    assert events[1]["entry"]["value"] == "ünïcode"

    failed = grpcurl(
        "-plaintext",
        *flags,
        kv_server.address,
        "kv.v1.KeyValue/Get",
        data={"key": "files/absent"},
        check=False,
    )
    assert failed.returncode != 0
    assert "Code: NotFound" in failed.stderr


def protoset_from_protoc(out: Path) -> None:
    subprocess.run(  # noqa: S603
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"-I{PROTO_ROOT}",
            f"-I{GOOGLEAPIS_INCLUDE}",
            "--include_imports",
            f"--descriptor_set_out={out}",
            *proto_files(),
        ],
        check=True,
        timeout=TIMEOUT_S,
    )


def protoset_from_buf(out: Path) -> None:
    # scripts/buf.sh fills build/googleapis and runs the pinned buf offline; an image is a
    # FileDescriptorSet with its imports.
    subprocess.run(  # noqa: S603
        [str(ROOT / "scripts" / "buf.sh"), "build", "proto", "-o", str(out)],
        check=True,
        timeout=60,
        cwd=ROOT,
    )


@pytest.mark.parametrize("build", [protoset_from_protoc, protoset_from_buf], ids=["protoc", "buf"])
def test_calls_from_a_descriptor_set(
    build: Callable[[Path], None], kv_server: ServerProcess, tmp_path: Path
) -> None:
    protoset = tmp_path / "kv.binpb"
    build(protoset)
    flags = ["-protoset", str(protoset)]
    put = call(flags, kv_server, "kv.v1.KeyValue/Put", {"key": "set/k", "value": "v", "ttl_ms": 60000})
    assert put["entry"]["expireTime"].endswith("Z")  # a Timestamp is RFC 3339 in JSON
    got = call(flags, kv_server, "kv.v1.KeyValue/Get", {"key": "set/k"})
    assert got["entry"]["value"] == "v"
    assert got["entry"]["modRevision"] == put["header"]["revision"]
    deleted = call(flags, kv_server, "kv.v1.KeyValue/Delete", {"key": "set/", "prefix": True})
    assert deleted["deleted"] == "1"
