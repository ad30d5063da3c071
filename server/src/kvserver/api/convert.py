"""Conversions between kv.v1 messages and the domain."""

from __future__ import annotations

from google.protobuf.timestamp_pb2 import Timestamp

from kv.v1 import kv_pb2
from kvserver.api.errors import status_for
from kvserver.domain import NO_EXPIRY, Entry, Event, EventType, KvError, PutResult
from kvserver.service.kv import NO_CONDITIONS, BatchOutcome, Conditions, PutSpec
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
    message = kv_pb2.Entry()
    _fill_entry(message, entry, with_value=with_value)
    return message


def _fill_entry(message: kv_pb2.Entry, entry: Entry, *, with_value: bool) -> None:
    message.key = entry.key
    message.create_revision = entry.create_revision
    message.mod_revision = entry.mod_revision
    message.version = entry.version
    if with_value and entry.value:
        try:
            message.value = entry.value.decode()
        except UnicodeDecodeError:
            message.value_bytes = entry.value
    if entry.expire_at_ms != NO_EXPIRY:
        message.expire_time.FromMilliseconds(entry.expire_at_ms)
    message.content_type = entry.content_type


def fill_put_response(response: kv_pb2.PutResponse, result: PutResult, *, return_previous: bool) -> None:
    """Write a put's result into `response`, in place (a BatchPutResponse holds many)."""
    response.header.revision = result.revision
    response.created = result.created
    _fill_entry(response.entry, result.entry, with_value=False)
    if return_previous and result.prev is not None:
        _fill_entry(response.prev_entry, result.prev, with_value=True)


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


# Watch fan-out: every stream of a key range sends the same events. A live message is assembled
# from each event serialised once, as a ready `events` field of WatchResponse, for every stream of
# its key range (the hub's feed keeps those bytes, keyed by the encoding function below).
_HEADER_FIELD_TAG = b"\x0a"  # WatchResponse.header: field 1, length-delimited
_EVENTS_FIELD_TAG = b"\x12"  # WatchResponse.events: field 2, length-delimited


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _event_field(event: Event) -> bytes:
    data = event_to_proto(event, with_previous=False).SerializeToString()
    return _EVENTS_FIELD_TAG + _varint(len(data)) + data


def _event_field_with_previous(event: Event) -> bytes:
    data = event_to_proto(event, with_previous=True).SerializeToString()
    return _EVENTS_FIELD_TAG + _varint(len(data)) + data


def watch_message_to_bytes(message: WatchMessage, *, with_previous: bool) -> bytes:
    """The serialised WatchResponse: the same bytes as watch_message_to_proto(...).SerializeToString().
    A message of live events is assembled from its events serialised once for all the streams that
    send them."""
    shared = message.shared
    live = not (message.initial_entries or message.initial_state_complete or message.cancel)
    if shared is not None and live:
        head = header(message.revision).SerializeToString()
        head = _HEADER_FIELD_TAG + _varint(len(head)) + head
        data = shared.encoded(_event_field_with_previous if with_previous else _event_field, head)
        if data is not None:
            return data
    return watch_message_to_proto(message, with_previous=with_previous).SerializeToString()


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


# BatchPut.


def put_specs(request: kv_pb2.BatchPutRequest) -> list[PutSpec]:
    """The puts of a BatchPutRequest, as the service takes them."""
    specs = []
    for put in request.puts:
        conditional = put.if_absent or put.if_present or put.if_mod_revision or put.if_version
        value = put.value_bytes if put.WhichOneof("content") == "value_bytes" else put.value.encode()
        specs.append(
            PutSpec(
                put.key,
                value,
                put.ttl_ms,
                conditions(put) if conditional else NO_CONDITIONS,
                put.content_type,
            )
        )
    return specs


def batch_put_response(request: kv_pb2.BatchPutRequest, outcome: BatchOutcome) -> kv_pb2.BatchPutResponse:
    """The BatchPutResponse: per put, its PutResponse, or its error mapped by api.errors."""
    response = kv_pb2.BatchPutResponse(header=header(outcome.revision))
    results = response.results
    for put, result in zip(request.puts, outcome.results, strict=True):
        item = results.add()
        if isinstance(result, KvError):
            item.error.code = status_for(result).value[0]
            item.error.message = str(result)
            continue
        fill_put_response(item.put, result, return_previous=put.return_previous)
    return response
