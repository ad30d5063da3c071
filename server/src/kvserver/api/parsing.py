"""Request deserialisation that reports a malformed message as INVALID_ARGUMENT.

grpcio turns an exception raised by a deserialiser into UNKNOWN with the exception's class in
the details. Here the deserialiser returns a `Malformed` value instead, which the servicer
reports with a message that names the field when it can.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import DecodeError, Message

M = TypeVar("M", bound=Message)


@dataclass(frozen=True, slots=True)
class Malformed:
    message: str


def parser(message_type: type[M]) -> Callable[[bytes], M | Malformed]:
    def parse(data: bytes) -> M | Malformed:
        try:
            return message_type.FromString(data)
        except DecodeError:
            descriptor = message_type.DESCRIPTOR
            field = _field_with_bad_utf8(descriptor, data)
            if field is not None:
                return Malformed(f"{field}: is not valid UTF-8")
            return Malformed(f"the request is not a valid {descriptor.full_name} message")

    return parse


def _field_with_bad_utf8(descriptor: Any, data: bytes) -> str | None:
    """The name of a top-level string field whose bytes are not UTF-8, found by walking the wire
    format (only length-delimited fields can hold strings)."""
    position = 0
    try:
        while position < len(data):
            tag, position = _varint(data, position)
            number, wire_type = tag >> 3, tag & 7
            if wire_type == 0:
                _, position = _varint(data, position)
            elif wire_type == 1:
                position += 8
            elif wire_type == 5:
                position += 4
            elif wire_type == 2:
                length, position = _varint(data, position)
                chunk = data[position : position + length]
                position += length
                field = descriptor.fields_by_number.get(number)
                if field is not None and field.type == FieldDescriptor.TYPE_STRING:
                    chunk.decode()
            else:
                return None
    except UnicodeDecodeError:
        return str(descriptor.fields_by_number[number].name)
    except IndexError:
        return None
    return None


def _varint(data: bytes, position: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        byte = data[position]
        position += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, position
        shift += 7
        if shift > 63:
            raise IndexError("varint too long")
