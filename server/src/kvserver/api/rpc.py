"""The plumbing every servicer shares: request parsing, the error path, handler tables."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc
from google.protobuf.message import Message

from kvserver import domain
from kvserver.api.errors import status_for
from kvserver.api.parsing import Malformed, parser

log = logging.getLogger("kvserver.api")

Req = TypeVar("Req", bound=Message)
Resp = TypeVar("Resp", bound=Message)
Context = grpc.aio.ServicerContext[Any, Any]


def request_id(context: Context) -> str:
    for key, value in context.invocation_metadata() or ():
        if key == "x-request-id":
            return str(value)[:64]
    return uuid.uuid4().hex[:16]


async def abort_for(error: Exception, context: Context, method: str) -> None:
    if isinstance(error, domain.KvError):
        code = status_for(error)
        if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL):
            log.error("%s failed (request %s): %s", method, request_id(context), error)
        await context.abort(code, str(error))
    reference = request_id(context)
    log.exception("%s failed unexpectedly (request %s)", method, reference, exc_info=error)
    await context.abort(grpc.StatusCode.INTERNAL, f"internal error (request {reference})")


def _guarded(
    method: str, behaviour: Callable[[Req, Context], Awaitable[Resp]]
) -> Callable[[Req | Malformed, Context], Awaitable[Resp]]:
    async def handle(request: Req | Malformed, context: Context) -> Resp:
        if isinstance(request, Malformed):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
            raise AssertionError("abort raises")
        try:
            return await behaviour(request, context)
        except Exception as error:
            if isinstance(error, grpc.aio.AbortError):
                raise
            await abort_for(error, context, method)
            raise

    return handle


UnaryBehaviour = Callable[[Any, Context], Awaitable[Message]]


def unary_handler(
    method: str, behaviour: UnaryBehaviour, request_type: type[Message]
) -> grpc.RpcMethodHandler[Any, Any]:
    return grpc.unary_unary_rpc_method_handler(
        _guarded(method, behaviour),
        request_deserializer=parser(request_type),
        response_serializer=serialize,
    )


def serialize(message: Message) -> bytes:
    return message.SerializeToString()
