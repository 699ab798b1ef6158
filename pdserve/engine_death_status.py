"""What a worker's callers hear when its engine died: the ``EngineDeadError`` that
escapes a servicer becomes UNAVAILABLE "engine died: …" (retry elsewhere: this
process is about to exit), never gRPC's UNKNOWN.

One server interceptor for every role, so no servicer needs to know about engine
death; it wraps the streaming handlers of the role's own services only (health and
reflection pass untouched).
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from pdserve.engine.async_engine import EngineDeadError


class EngineDeathStatus(grpc.aio.ServerInterceptor):
    def __init__(self, service_names: list[str]) -> None:
        self.service_names = frozenset(service_names)

    async def intercept_service(
            self, continuation: Callable[[grpc.HandlerCallDetails],
                                         Awaitable[grpc.RpcMethodHandler]],
            details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        service = details.method.split("/")[1] if details.method.count("/") == 2 else ""
        if handler is None or service not in self.service_names:
            return handler
        if handler.unary_stream is not None and \
                inspect.isasyncgenfunction(handler.unary_stream):
            return grpc.unary_stream_rpc_method_handler(
                _streaming(handler.unary_stream), handler.request_deserializer,
                handler.response_serializer)
        return handler


def _streaming(behavior: Callable[[Any, grpc.aio.ServicerContext], AsyncIterator[Any]],
               ) -> Callable[[Any, grpc.aio.ServicerContext], AsyncIterator[Any]]:
    async def guarded(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        try:
            async for message in behavior(request, context):
                yield message
        except EngineDeadError as e:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(e))

    return guarded
