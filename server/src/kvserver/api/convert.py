"""Conversions between kv.v1 messages and the domain."""

from __future__ import annotations

from google.protobuf.timestamp_pb2 import Timestamp

from kv.v1 import kv_pb2
from kvserver.domain import NO_EXPIRY, Entry, Event, EventType
from kvserver.service.kv import Conditions
from kvserver.service.watch import CancelReason, WatchMessage

_EVENT_TYPES = {
    EventType.PUT: kv_pb2.Event.TYPE_PUT,
    EventType.DELETE: kv_pb2.Event.TYPE_DELETE,
    EventType.EXPIRE: kv_pb2.Event.TYPE_EXPIRE,
}
CANCEL_REASONS = {
    CancelReason.COMPACTED: kv_pb2.WatchCancel.REASON_COMPACTED,
    CancelReason.SLOW_CONSUMER: kv_pb2.WatchCancel.REASON_SLOW_CONSUMER,
    CancelReason.SHUTDOWN: kv_pb2.WatchCancel.REASON_SHUTDOWN,
}


def header(revision: int) -> kv_pb2.ResponseHeader:
    return kv_pb2.ResponseHeader(revision=revision)


def entry_to_proto(entry: Entry, *, with_value: bool = True) -> kv_pb2.Entry:
    message = kv_pb2.Entry(
        key=entry.key,
        create_revision=entry.create_revision,
        mod_revision=entry.mod_revision,
        version=entry.version,
    )
    if with_value and entry.value:
        try:
            message.value = entry.value.decode()
        except UnicodeDecodeError:
            message.value_bytes = entry.value
    if entry.expire_at_ms != NO_EXPIRY:
        message.expire_time.CopyFrom(timestamp_from_ms(entry.expire_at_ms))
    message.content_type = entry.content_type
    return message


def timestamp_from_ms(ms: int) -> Timestamp:
    stamp = Timestamp()
    stamp.FromMilliseconds(ms)
    return stamp


def event_to_proto(event: Event, *, with_previous: bool) -> kv_pb2.Event:
    message = kv_pb2.Event(type=_EVENT_TYPES[event.type])
    if event.entry is not None:
        message.entry.CopyFrom(entry_to_proto(event.entry))
    else:
        message.entry.key = event.key
        message.entry.mod_revision = event.revision
    if with_previous and event.prev is not None:
        message.prev_entry.CopyFrom(entry_to_proto(event.prev))
    return message


def request_value(request: kv_pb2.PutRequest) -> bytes:
    if request.WhichOneof("content") == "value_bytes":
        return request.value_bytes
    return request.value.encode()


def conditions(request: kv_pb2.PutRequest | kv_pb2.PutValueRequest | kv_pb2.DeleteRequest) -> Conditions:
    if not isinstance(request, kv_pb2.DeleteRequest):
        return Conditions(request.if_absent, request.if_present, request.if_mod_revision, request.if_version)
    return Conditions(if_mod_revision=request.if_mod_revision, if_version=request.if_version)


def watch_message_to_proto(message: WatchMessage, *, with_previous: bool) -> kv_pb2.WatchResponse:
    response = kv_pb2.WatchResponse(
        header=header(message.revision),
        events=[event_to_proto(event, with_previous=with_previous) for event in message.events],
        initial_entries=[entry_to_proto(entry) for entry in message.initial_entries],
        initial_state_complete=message.initial_state_complete,
    )
    if message.cancel is not None:
        response.cancel.CopyFrom(
            kv_pb2.WatchCancel(
                reason=CANCEL_REASONS[message.cancel.reason],
                compact_revision=message.cancel.compact_revision,
                resume_revision=message.cancel.resume_revision,
                message=message.cancel.message,
            )
        )
    return response
