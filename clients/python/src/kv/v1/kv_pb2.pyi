import datetime

from google.api import annotations_pb2 as _annotations_pb2
from google.api import httpbody_pb2 as _httpbody_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Consistency(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CONSISTENCY_UNSPECIFIED: _ClassVar[Consistency]
    CONSISTENCY_LINEARIZABLE: _ClassVar[Consistency]
    CONSISTENCY_LOCAL: _ClassVar[Consistency]
CONSISTENCY_UNSPECIFIED: Consistency
CONSISTENCY_LINEARIZABLE: Consistency
CONSISTENCY_LOCAL: Consistency

class ResponseHeader(_message.Message):
    __slots__ = ("revision",)
    REVISION_FIELD_NUMBER: _ClassVar[int]
    revision: int
    def __init__(self, revision: _Optional[int] = ...) -> None: ...

class Entry(_message.Message):
    __slots__ = ("key", "value", "value_bytes", "create_revision", "mod_revision", "version", "expire_time", "content_type")
    KEY_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    VALUE_BYTES_FIELD_NUMBER: _ClassVar[int]
    CREATE_REVISION_FIELD_NUMBER: _ClassVar[int]
    MOD_REVISION_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    EXPIRE_TIME_FIELD_NUMBER: _ClassVar[int]
    CONTENT_TYPE_FIELD_NUMBER: _ClassVar[int]
    key: str
    value: str
    value_bytes: bytes
    create_revision: int
    mod_revision: int
    version: int
    expire_time: _timestamp_pb2.Timestamp
    content_type: str
    def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ..., value_bytes: _Optional[bytes] = ..., create_revision: _Optional[int] = ..., mod_revision: _Optional[int] = ..., version: _Optional[int] = ..., expire_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., content_type: _Optional[str] = ...) -> None: ...

class Event(_message.Message):
    __slots__ = ("type", "entry", "prev_entry")
    class Type(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        TYPE_UNSPECIFIED: _ClassVar[Event.Type]
        TYPE_PUT: _ClassVar[Event.Type]
        TYPE_DELETE: _ClassVar[Event.Type]
        TYPE_EXPIRE: _ClassVar[Event.Type]
    TYPE_UNSPECIFIED: Event.Type
    TYPE_PUT: Event.Type
    TYPE_DELETE: Event.Type
    TYPE_EXPIRE: Event.Type
    TYPE_FIELD_NUMBER: _ClassVar[int]
    ENTRY_FIELD_NUMBER: _ClassVar[int]
    PREV_ENTRY_FIELD_NUMBER: _ClassVar[int]
    type: Event.Type
    entry: Entry
    prev_entry: Entry
    def __init__(self, type: _Optional[_Union[Event.Type, str]] = ..., entry: _Optional[_Union[Entry, _Mapping]] = ..., prev_entry: _Optional[_Union[Entry, _Mapping]] = ...) -> None: ...

class GetRequest(_message.Message):
    __slots__ = ("key", "consistency")
    KEY_FIELD_NUMBER: _ClassVar[int]
    CONSISTENCY_FIELD_NUMBER: _ClassVar[int]
    key: str
    consistency: Consistency
    def __init__(self, key: _Optional[str] = ..., consistency: _Optional[_Union[Consistency, str]] = ...) -> None: ...

class GetResponse(_message.Message):
    __slots__ = ("header", "entry")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    ENTRY_FIELD_NUMBER: _ClassVar[int]
    header: ResponseHeader
    entry: Entry
    def __init__(self, header: _Optional[_Union[ResponseHeader, _Mapping]] = ..., entry: _Optional[_Union[Entry, _Mapping]] = ...) -> None: ...

class PutRequest(_message.Message):
    __slots__ = ("key", "value", "value_bytes", "ttl_ms", "if_absent", "if_present", "if_mod_revision", "if_version", "return_previous", "content_type")
    KEY_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    VALUE_BYTES_FIELD_NUMBER: _ClassVar[int]
    TTL_MS_FIELD_NUMBER: _ClassVar[int]
    IF_ABSENT_FIELD_NUMBER: _ClassVar[int]
    IF_PRESENT_FIELD_NUMBER: _ClassVar[int]
    IF_MOD_REVISION_FIELD_NUMBER: _ClassVar[int]
    IF_VERSION_FIELD_NUMBER: _ClassVar[int]
    RETURN_PREVIOUS_FIELD_NUMBER: _ClassVar[int]
    CONTENT_TYPE_FIELD_NUMBER: _ClassVar[int]
    key: str
    value: str
    value_bytes: bytes
    ttl_ms: int
    if_absent: bool
    if_present: bool
    if_mod_revision: int
    if_version: int
    return_previous: bool
    content_type: str
    def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ..., value_bytes: _Optional[bytes] = ..., ttl_ms: _Optional[int] = ..., if_absent: _Optional[bool] = ..., if_present: _Optional[bool] = ..., if_mod_revision: _Optional[int] = ..., if_version: _Optional[int] = ..., return_previous: _Optional[bool] = ..., content_type: _Optional[str] = ...) -> None: ...

class GetValueRequest(_message.Message):
    __slots__ = ("key", "consistency")
    KEY_FIELD_NUMBER: _ClassVar[int]
    CONSISTENCY_FIELD_NUMBER: _ClassVar[int]
    key: str
    consistency: Consistency
    def __init__(self, key: _Optional[str] = ..., consistency: _Optional[_Union[Consistency, str]] = ...) -> None: ...

class PutValueRequest(_message.Message):
    __slots__ = ("key", "body", "ttl_ms", "if_absent", "if_present", "if_mod_revision", "if_version")
    KEY_FIELD_NUMBER: _ClassVar[int]
    BODY_FIELD_NUMBER: _ClassVar[int]
    TTL_MS_FIELD_NUMBER: _ClassVar[int]
    IF_ABSENT_FIELD_NUMBER: _ClassVar[int]
    IF_PRESENT_FIELD_NUMBER: _ClassVar[int]
    IF_MOD_REVISION_FIELD_NUMBER: _ClassVar[int]
    IF_VERSION_FIELD_NUMBER: _ClassVar[int]
    key: str
    body: _httpbody_pb2.HttpBody
    ttl_ms: int
    if_absent: bool
    if_present: bool
    if_mod_revision: int
    if_version: int
    def __init__(self, key: _Optional[str] = ..., body: _Optional[_Union[_httpbody_pb2.HttpBody, _Mapping]] = ..., ttl_ms: _Optional[int] = ..., if_absent: _Optional[bool] = ..., if_present: _Optional[bool] = ..., if_mod_revision: _Optional[int] = ..., if_version: _Optional[int] = ...) -> None: ...

class PutValueResponse(_message.Message):
    __slots__ = ("header", "created", "entry")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    ENTRY_FIELD_NUMBER: _ClassVar[int]
    header: ResponseHeader
    created: bool
    entry: Entry
    def __init__(self, header: _Optional[_Union[ResponseHeader, _Mapping]] = ..., created: _Optional[bool] = ..., entry: _Optional[_Union[Entry, _Mapping]] = ...) -> None: ...

class PutResponse(_message.Message):
    __slots__ = ("header", "created", "entry", "prev_entry")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    ENTRY_FIELD_NUMBER: _ClassVar[int]
    PREV_ENTRY_FIELD_NUMBER: _ClassVar[int]
    header: ResponseHeader
    created: bool
    entry: Entry
    prev_entry: Entry
    def __init__(self, header: _Optional[_Union[ResponseHeader, _Mapping]] = ..., created: _Optional[bool] = ..., entry: _Optional[_Union[Entry, _Mapping]] = ..., prev_entry: _Optional[_Union[Entry, _Mapping]] = ...) -> None: ...

class BatchPutRequest(_message.Message):
    __slots__ = ("puts",)
    PUTS_FIELD_NUMBER: _ClassVar[int]
    puts: _containers.RepeatedCompositeFieldContainer[PutRequest]
    def __init__(self, puts: _Optional[_Iterable[_Union[PutRequest, _Mapping]]] = ...) -> None: ...

class BatchPutResponse(_message.Message):
    __slots__ = ("header", "results")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    header: ResponseHeader
    results: _containers.RepeatedCompositeFieldContainer[BatchPutResult]
    def __init__(self, header: _Optional[_Union[ResponseHeader, _Mapping]] = ..., results: _Optional[_Iterable[_Union[BatchPutResult, _Mapping]]] = ...) -> None: ...

class BatchPutResult(_message.Message):
    __slots__ = ("put", "error")
    PUT_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    put: PutResponse
    error: BatchPutError
    def __init__(self, put: _Optional[_Union[PutResponse, _Mapping]] = ..., error: _Optional[_Union[BatchPutError, _Mapping]] = ...) -> None: ...

class BatchPutError(_message.Message):
    __slots__ = ("code", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: int
    message: str
    def __init__(self, code: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...

class DeleteRequest(_message.Message):
    __slots__ = ("key", "prefix", "allow_missing", "if_mod_revision", "if_version", "return_previous")
    KEY_FIELD_NUMBER: _ClassVar[int]
    PREFIX_FIELD_NUMBER: _ClassVar[int]
    ALLOW_MISSING_FIELD_NUMBER: _ClassVar[int]
    IF_MOD_REVISION_FIELD_NUMBER: _ClassVar[int]
    IF_VERSION_FIELD_NUMBER: _ClassVar[int]
    RETURN_PREVIOUS_FIELD_NUMBER: _ClassVar[int]
    key: str
    prefix: bool
    allow_missing: bool
    if_mod_revision: int
    if_version: int
    return_previous: bool
    def __init__(self, key: _Optional[str] = ..., prefix: _Optional[bool] = ..., allow_missing: _Optional[bool] = ..., if_mod_revision: _Optional[int] = ..., if_version: _Optional[int] = ..., return_previous: _Optional[bool] = ...) -> None: ...

class DeleteResponse(_message.Message):
    __slots__ = ("header", "deleted", "prev_entries")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    DELETED_FIELD_NUMBER: _ClassVar[int]
    PREV_ENTRIES_FIELD_NUMBER: _ClassVar[int]
    header: ResponseHeader
    deleted: int
    prev_entries: _containers.RepeatedCompositeFieldContainer[Entry]
    def __init__(self, header: _Optional[_Union[ResponseHeader, _Mapping]] = ..., deleted: _Optional[int] = ..., prev_entries: _Optional[_Iterable[_Union[Entry, _Mapping]]] = ...) -> None: ...

class ListRequest(_message.Message):
    __slots__ = ("prefix", "start_key", "end_key", "page_size", "page_token", "keys_only", "include_count")
    PREFIX_FIELD_NUMBER: _ClassVar[int]
    START_KEY_FIELD_NUMBER: _ClassVar[int]
    END_KEY_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    KEYS_ONLY_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_COUNT_FIELD_NUMBER: _ClassVar[int]
    prefix: str
    start_key: str
    end_key: str
    page_size: int
    page_token: str
    keys_only: bool
    include_count: bool
    def __init__(self, prefix: _Optional[str] = ..., start_key: _Optional[str] = ..., end_key: _Optional[str] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ..., keys_only: _Optional[bool] = ..., include_count: _Optional[bool] = ...) -> None: ...

class ListResponse(_message.Message):
    __slots__ = ("header", "entries", "next_page_token", "count")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    header: ResponseHeader
    entries: _containers.RepeatedCompositeFieldContainer[Entry]
    next_page_token: str
    count: int
    def __init__(self, header: _Optional[_Union[ResponseHeader, _Mapping]] = ..., entries: _Optional[_Iterable[_Union[Entry, _Mapping]]] = ..., next_page_token: _Optional[str] = ..., count: _Optional[int] = ...) -> None: ...

class WatchRequest(_message.Message):
    __slots__ = ("key", "prefix", "start_revision", "include_initial_state", "include_previous", "progress_interval_ms")
    KEY_FIELD_NUMBER: _ClassVar[int]
    PREFIX_FIELD_NUMBER: _ClassVar[int]
    START_REVISION_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_INITIAL_STATE_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_PREVIOUS_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_INTERVAL_MS_FIELD_NUMBER: _ClassVar[int]
    key: str
    prefix: bool
    start_revision: int
    include_initial_state: bool
    include_previous: bool
    progress_interval_ms: int
    def __init__(self, key: _Optional[str] = ..., prefix: _Optional[bool] = ..., start_revision: _Optional[int] = ..., include_initial_state: _Optional[bool] = ..., include_previous: _Optional[bool] = ..., progress_interval_ms: _Optional[int] = ...) -> None: ...

class WatchResponse(_message.Message):
    __slots__ = ("header", "events", "initial_entries", "initial_state_complete", "cancel")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    INITIAL_ENTRIES_FIELD_NUMBER: _ClassVar[int]
    INITIAL_STATE_COMPLETE_FIELD_NUMBER: _ClassVar[int]
    CANCEL_FIELD_NUMBER: _ClassVar[int]
    header: ResponseHeader
    events: _containers.RepeatedCompositeFieldContainer[Event]
    initial_entries: _containers.RepeatedCompositeFieldContainer[Entry]
    initial_state_complete: bool
    cancel: WatchCancel
    def __init__(self, header: _Optional[_Union[ResponseHeader, _Mapping]] = ..., events: _Optional[_Iterable[_Union[Event, _Mapping]]] = ..., initial_entries: _Optional[_Iterable[_Union[Entry, _Mapping]]] = ..., initial_state_complete: _Optional[bool] = ..., cancel: _Optional[_Union[WatchCancel, _Mapping]] = ...) -> None: ...

class WatchCancel(_message.Message):
    __slots__ = ("reason", "compact_revision", "resume_revision", "message")
    class Reason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        REASON_UNSPECIFIED: _ClassVar[WatchCancel.Reason]
        REASON_COMPACTED: _ClassVar[WatchCancel.Reason]
        REASON_SLOW_CONSUMER: _ClassVar[WatchCancel.Reason]
        REASON_SHUTDOWN: _ClassVar[WatchCancel.Reason]
    REASON_UNSPECIFIED: WatchCancel.Reason
    REASON_COMPACTED: WatchCancel.Reason
    REASON_SLOW_CONSUMER: WatchCancel.Reason
    REASON_SHUTDOWN: WatchCancel.Reason
    REASON_FIELD_NUMBER: _ClassVar[int]
    COMPACT_REVISION_FIELD_NUMBER: _ClassVar[int]
    RESUME_REVISION_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    reason: WatchCancel.Reason
    compact_revision: int
    resume_revision: int
    message: str
    def __init__(self, reason: _Optional[_Union[WatchCancel.Reason, str]] = ..., compact_revision: _Optional[int] = ..., resume_revision: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...

class StatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StatusResponse(_message.Message):
    __slots__ = ("header", "server_version", "server_id", "store", "compact_revision", "key_count", "limits", "started_time")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    SERVER_VERSION_FIELD_NUMBER: _ClassVar[int]
    SERVER_ID_FIELD_NUMBER: _ClassVar[int]
    STORE_FIELD_NUMBER: _ClassVar[int]
    COMPACT_REVISION_FIELD_NUMBER: _ClassVar[int]
    KEY_COUNT_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    STARTED_TIME_FIELD_NUMBER: _ClassVar[int]
    header: ResponseHeader
    server_version: str
    server_id: str
    store: str
    compact_revision: int
    key_count: int
    limits: Limits
    started_time: _timestamp_pb2.Timestamp
    def __init__(self, header: _Optional[_Union[ResponseHeader, _Mapping]] = ..., server_version: _Optional[str] = ..., server_id: _Optional[str] = ..., store: _Optional[str] = ..., compact_revision: _Optional[int] = ..., key_count: _Optional[int] = ..., limits: _Optional[_Union[Limits, _Mapping]] = ..., started_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class Limits(_message.Message):
    __slots__ = ("max_key_bytes", "max_value_bytes", "default_page_size", "max_page_size", "default_progress_interval_ms")
    MAX_KEY_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_VALUE_BYTES_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_PROGRESS_INTERVAL_MS_FIELD_NUMBER: _ClassVar[int]
    max_key_bytes: int
    max_value_bytes: int
    default_page_size: int
    max_page_size: int
    default_progress_interval_ms: int
    def __init__(self, max_key_bytes: _Optional[int] = ..., max_value_bytes: _Optional[int] = ..., default_page_size: _Optional[int] = ..., max_page_size: _Optional[int] = ..., default_progress_interval_ms: _Optional[int] = ...) -> None: ...
