"""Optional API key on the public API: ``Authorization: Bearer KEY`` on HTTP
``/v1/*`` and ``authorization: Bearer KEY`` metadata on ``pdserve.v1.Generation``.

Health, reflection and metrics stay open for probes and scrapers. Only a SHA-256
of the expected header is kept, and the comparison runs in constant time.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

GUARDED_GRPC_PREFIX = "/pdserve.v1.Generation/"


class ApiKey:
    def __init__(self, key: str) -> None:
        if not key:
            raise ValueError("api_key must be a non-empty string")
        self._digest = _sha256(f"Bearer {key}")

    def accepts(self, authorization: str | None) -> bool:
        return hmac.compare_digest(self._digest, _sha256(authorization or ""))


def _sha256(text: str) -> bytes:
    return hashlib.sha256(text.encode()).digest()


class ApiKeyInterceptor(grpc.aio.ServerInterceptor):
    """Rejects calls to the public service without the key, UNAUTHENTICATED."""

    def __init__(self, key: ApiKey) -> None:
        self.key = key

    async def intercept_service(
            self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]],
            details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(details)
        if handler is None or not details.method.startswith(GUARDED_GRPC_PREFIX):
            return handler
        meta = dict(details.invocation_metadata or ())
        if self.key.accepts(meta.get("authorization")):
            return handler
        return _rejecting(handler)


async def _reject(request: Any, context: grpc.aio.ServicerContext) -> None:
    await context.abort(grpc.StatusCode.UNAUTHENTICATED,
                        "missing or wrong API key: send metadata 'authorization: Bearer KEY'")


async def _reject_stream(request: Any, context: grpc.aio.ServicerContext) -> Any:
    await _reject(request, context)
    yield  # pragma: no cover - makes this an async generator, as the method expects


def _rejecting(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """A handler of the same shape as the real one that only rejects."""
    de, ser = handler.request_deserializer, handler.response_serializer
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(_reject_stream, de, ser)
    return grpc.unary_unary_rpc_method_handler(_reject, de, ser)
