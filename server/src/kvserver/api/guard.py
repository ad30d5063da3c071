"""The gate in front of every kv.v1.KeyValue and kv.compat.v1.CompatService call.

`Gate.wrap` wraps a service's generic handler: each method handler it returns first checks the
call's bearer token against api.auth (with the parsed request, so a token's key prefix is
enforced on the keys the request names), then runs the method, a unary one under the server's
own deadline (`--request-timeout`, DEADLINE_EXCEEDED), and reports the outcome to a
`CallObserver` (the metrics). One wrapper for every method of the service, present and future:
a method api.auth has no rule for is refused to every token.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, cast

import grpc

from kvserver.api.auth import (
    PERMISSION_DENIED_MESSAGE,
    UNAUTHENTICATED_MESSAGE,
    Decision,
    TokenAuthority,
)
from kvserver.api.rpc import Context, request_id

log = logging.getLogger("kvserver.api")

_ABORTS = {
    Decision.UNAUTHENTICATED: (grpc.StatusCode.UNAUTHENTICATED, UNAUTHENTICATED_MESSAGE),
    Decision.PERMISSION_DENIED: (grpc.StatusCode.PERMISSION_DENIED, PERMISSION_DENIED_MESSAGE),
}

UnaryBehaviour = Callable[[Any, Context], Awaitable[Any]]
StreamBehaviour = Callable[[Any, Context], AsyncIterator[Any]]


class CallObserver(Protocol):
    def observe(self, service: str, method: str, code: str, seconds: float | None) -> None:
        """One finished call: its status code name ("OK", "NOT_FOUND", ...) and, for a unary
        call, how long the server took (None for a stream)."""


@dataclass
class Gate:
    authority: TokenAuthority | None = None
    request_timeout_s: float = 0.0
    observer: CallObserver | None = None

    def wrap(self, handler: grpc.GenericRpcHandler[Any, Any]) -> grpc.GenericRpcHandler[Any, Any]:
        return _GatedHandler(handler, self)

    async def check(self, method: str, request: object, context: Context) -> None:
        """Abort the call unless its token allows it (nothing to check without an authority)."""
        if self.authority is None:
            return
        decision = self.authority.decide(method, context.invocation_metadata() or (), request)
        if decision is Decision.ALLOWED:
            return
        code, message = _ABORTS[decision]
        # DEBUG only: a client without credentials must not be able to flood the log.
        log.debug(
            "%s refused (%s, request %s, peer %s)",
            method,
            decision.value,
            request_id(context),
            context.peer(),
        )
        await context.abort(code, message)

    def unary(self, method: str, behaviour: UnaryBehaviour) -> UnaryBehaviour:
        service, name = _split(method)

        async def handle(request: Any, context: Context) -> Any:
            started = time.perf_counter()
            code = "UNKNOWN"
            try:
                await self.check(method, request, context)
                if self.request_timeout_s > 0:
                    try:
                        async with asyncio.timeout(self.request_timeout_s):
                            response = await behaviour(request, context)
                    except TimeoutError:
                        await context.abort(
                            grpc.StatusCode.DEADLINE_EXCEEDED,
                            f"the server's deadline of {self.request_timeout_s:g} s passed",
                        )
                else:
                    response = await behaviour(request, context)
                code = "OK"
                return response
            except grpc.aio.AbortError:
                code = _code_name(context)
                raise
            except asyncio.CancelledError:
                code = "CANCELLED"
                raise
            finally:
                if self.observer is not None:
                    self.observer.observe(service, name, code, time.perf_counter() - started)

        return handle

    def stream(self, method: str, behaviour: StreamBehaviour) -> StreamBehaviour:
        service, name = _split(method)

        async def handle(request: Any, context: Context) -> AsyncIterator[Any]:
            code = "UNKNOWN"
            try:
                await self.check(method, request, context)
                responses = behaviour(request, context)
                try:
                    async for response in responses:
                        yield response
                finally:
                    # Closed here, not by the garbage collector: the stream's own cleanup (the
                    # watch hub's count of open streams) runs when the call ends.
                    await responses.aclose()  # type: ignore[attr-defined]
                code = "OK"
            except grpc.aio.AbortError:
                code = _code_name(context)
                raise
            except (asyncio.CancelledError, GeneratorExit):
                code = "CANCELLED"
                raise
            finally:
                if self.observer is not None:
                    self.observer.observe(service, name, code, None)

        return handle


@dataclass
class _GatedHandler(grpc.GenericRpcHandler):  # type: ignore[type-arg]
    inner: grpc.GenericRpcHandler[Any, Any]
    gate: Gate
    _handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = field(default_factory=dict)

    def service(
        self, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        method = handler_call_details.method
        gated = self._handlers.get(method)
        if gated is None:
            # Only the service's own methods are kept: any other name a client sends is not.
            gated = self._gated(self.inner.service(handler_call_details), method)
            if gated is not None:
                self._handlers[method] = gated
        return gated

    def _gated(
        self, handler: grpc.RpcMethodHandler[Any, Any] | None, method: str
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        if handler is None:
            return None
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                self.gate.unary(method, cast(UnaryBehaviour, handler.unary_unary)),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                cast(Any, self.gate.stream(method, cast(StreamBehaviour, handler.unary_stream))),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        # A client-streaming method would need its own gate: refuse it rather than serve it open.
        log.error("%s has no gate for its kind of method: not served", method)
        return None


def _split(method: str) -> tuple[str, str]:
    service, _, name = method.strip("/").rpartition("/")
    return service, name


def _code_name(context: Context) -> str:
    code = context.code()
    return code.name if isinstance(code, grpc.StatusCode) else "UNKNOWN"
