"""Protobuf wire format and gRPC framing by hand: etcd's messages need no generated code."""

from __future__ import annotations


class BenchError(Exception):
    """A server, a tool or a correctness check failed."""


def varint(value: int) -> bytes:
    """Encode a non-negative int as a protobuf base-128 varint."""
    out = bytearray()
    while True:
        low, value = value & 0x7F, value >> 7
        if not value:
            out.append(low)
            return bytes(out)
        out.append(low | 0x80)


def pb_bytes(number: int, data: bytes) -> bytes:
    """A length-delimited field (wire type 2)."""
    return varint(number << 3 | 2) + varint(len(data)) + data


def pb_varint(number: int, value: int) -> bytes:
    """A varint field (wire type 0)."""
    return varint(number << 3) + varint(value)


def read_varint(data: bytes, pos: int) -> tuple[int, int]:
    """Decode the varint at data[pos:]; return (value, next position)."""
    result = shift = 0
    while True:
        if pos >= len(data):
            raise BenchError("truncated protobuf varint")
        byte = data[pos]
        result |= (byte & 0x7F) << shift
        pos, shift = pos + 1, shift + 7
        if not byte & 0x80:
            return result, pos


def pb_fields(data: bytes) -> dict[int, list[int | bytes]]:
    """Decode one message level into {field number: [values]} (no schema needed)."""
    fields: dict[int, list[int | bytes]] = {}
    pos = 0
    while pos < len(data):
        tag, pos = read_varint(data, pos)
        number, wire = tag >> 3, tag & 7
        value: int | bytes
        if wire == 0:
            value, pos = read_varint(data, pos)
        elif wire == 2:
            size, pos = read_varint(data, pos)
            value, pos = data[pos : pos + size], pos + size
        elif wire in (1, 5):
            width = 8 if wire == 1 else 4
            value, pos = int.from_bytes(data[pos : pos + width], "little"), pos + width
        else:
            raise BenchError(f"unsupported protobuf wire type {wire}")
        fields.setdefault(number, []).append(value)
    return fields


def pb_first_int(fields: dict[int, list[int | bytes]], number: int) -> int:
    """The first varint value of a field, 0 when absent (proto3 default)."""
    value = fields.get(number, [0])[0]
    return value if isinstance(value, int) else 0


def pb_first_bytes(fields: dict[int, list[int | bytes]], number: int) -> bytes:
    """The first length-delimited value of a field, b"" when absent."""
    value = fields.get(number, [b""])[0]
    return value if isinstance(value, bytes) else b""


def grpc_frame(message: bytes) -> bytes:
    """The gRPC length-prefixed message: no compression, 4-byte big-endian length."""
    return b"\x00" + len(message).to_bytes(4, "big") + message


def prefix_end(prefix: str) -> str:
    """The first key after every key that starts with `prefix` (etcd's range_end for a prefix)."""
    return prefix[:-1] + chr(ord(prefix[-1]) + 1)
