"""kv.compat.v1.CompatService: the classic key-value REST shapes over the same service layer."""

from __future__ import annotations

import base64
import json
from typing import Any

import grpc
from google.api import httpbody_pb2

from kv.compat.v1 import compat_pb2
from kvserver.api import convert
from kvserver.api.rpc import Context, unary_handler
from kvserver.api.servicer import announce_created
from kvserver.domain import Entry, ResourceExhausted, StorageFailure, wall_clock_ms
from kvserver.service.kv import KvService, ListQuery

SERVICE_NAME = compat_pb2.DESCRIPTOR.services_by_name["CompatService"].full_name
_JSON = "application/json"


def text_of(value: bytes) -> str:
    """A value as text: UTF-8 as it is, anything else as "base64:" and its base64 encoding."""
    try:
        return value.decode()
    except UnicodeDecodeError:
        return "base64:" + base64.b64encode(value).decode()


def body_value(content_type: str, data: bytes) -> bytes:
    """The value a PutKey body stores: the string of a JSON {"value": "..."} body, else the body."""
    if content_type.split(";")[0].strip().lower() != _JSON:
        return data
    try:
        document = json.loads(data)
    except ValueError:
        return data
    if isinstance(document, dict) and set(document) == {"value"} and isinstance(document["value"], str):
        return document["value"].encode()
    return data


_STORED = "Key-value pair stored successfully"


def _outcome(created: bool) -> tuple[str, str]:
    return ("created" if created else "updated"), _STORED


class CompatServicer:
    def __init__(self, kv: KvService, max_all_keys: int) -> None:
        self._kv = kv
        self._max_all_keys = max_all_keys

    async def set(self, request: compat_pb2.SetRequest, context: Context) -> compat_pb2.SetResponse:
        result = await self._kv.put(request.key, request.value.encode())
        await announce_created(context, result.created)
        status, message = _outcome(result.created)
        return compat_pb2.SetResponse(
            key=request.key, value=request.value, version=result.entry.version, status=status, message=message
        )

    async def put_key(self, request: compat_pb2.PutKeyRequest, context: Context) -> compat_pb2.PutKeyResponse:
        value = body_value(request.body.content_type, request.body.data)
        result = await self._kv.put(request.key, value)
        await announce_created(context, result.created)
        status, message = _outcome(result.created)
        try:
            text = value.decode()
        except UnicodeDecodeError:
            text = ""
        return compat_pb2.PutKeyResponse(
            key=request.key, value=text, version=result.entry.version, status=status, message=message
        )

    async def get(self, request: compat_pb2.GetRequest, context: Context) -> compat_pb2.GetResponse:
        entry = await self._read(request.key)
        return compat_pb2.GetResponse(key=entry.key, value=text_of(entry.value), version=entry.version)

    async def local_read(
        self, request: compat_pb2.LocalReadRequest, context: Context
    ) -> compat_pb2.LocalReadResponse:
        entry = await self._read(request.key, local=True)
        return compat_pb2.LocalReadResponse(key=entry.key, value=text_of(entry.value), version=entry.version)

    async def _read(self, key: str, *, local: bool = False) -> Entry:
        _, entry = await self._kv.get(key, local=local)
        return entry

    async def delete(self, request: compat_pb2.DeleteRequest, context: Context) -> compat_pb2.DeleteResponse:
        await self._kv.delete(request.key)
        return compat_pb2.DeleteResponse(key=request.key, deleted=True, message="Key-value pair deleted")

    async def all(self, request: compat_pb2.AllRequest, context: Context) -> httpbody_pb2.HttpBody:
        pairs: dict[str, str] = {}
        token = ""
        while True:
            page = await self._kv.list(ListQuery(page_size=self._kv.limits.max_page_size, page_token=token))
            pairs.update((entry.key, text_of(entry.value)) for entry in page.entries)
            if len(pairs) > self._max_all_keys:
                raise ResourceExhausted(
                    f"the store has more than {self._max_all_keys} keys: list them in pages with /v1/kv"
                )
            token = page.next_page_token
            if not token:
                return httpbody_pb2.HttpBody(content_type=_JSON, data=json.dumps(pairs).encode())

    async def health(self, request: compat_pb2.HealthRequest, context: Context) -> compat_pb2.HealthResponse:
        try:
            await self._kv.store.check()
        except StorageFailure as error:
            raise StorageFailure(f"unhealthy: {error}") from error
        return compat_pb2.HealthResponse(status="healthy", time=convert.timestamp_from_ms(wall_clock_ms()))

    def handler(self) -> grpc.GenericRpcHandler[Any, Any]:
        return grpc.method_handlers_generic_handler(
            SERVICE_NAME,
            {
                "Set": unary_handler("Set", self.set, compat_pb2.SetRequest),
                "PutKey": unary_handler("PutKey", self.put_key, compat_pb2.PutKeyRequest),
                "Get": unary_handler("Get", self.get, compat_pb2.GetRequest),
                "LocalRead": unary_handler("LocalRead", self.local_read, compat_pb2.LocalReadRequest),
                "Delete": unary_handler("Delete", self.delete, compat_pb2.DeleteRequest),
                "All": unary_handler("All", self.all, compat_pb2.AllRequest),
                "Health": unary_handler("Health", self.health, compat_pb2.HealthRequest),
            },
        )
