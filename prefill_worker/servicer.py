"""``PrefillWorker.Prefill``: header, then KV chunks as each layer is computed, then
the first token.

Per request: RECEIVED (request converted and checked, else INVALID_ARGUMENT) →
PREFILLING (queued in the engine, then computed; each layer of each chunk goes out
as soon as the forward pass wrote it) → FIRST_TOKEN sent → DONE. A cancelled call
aborts the request in the engine, which frees its blocks. Every line logged while
serving a request carries its id.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import AsyncIterator

import grpc

from pdserve._proto.pdserve.v1 import worker_pb2, worker_pb2_grpc
from pdserve.config import WorkerConfig
from pdserve.convert import event_to_pb, kv_request_from_pb, response_bytes
from pdserve.engine.async_engine import AsyncEngine, KVPiece
from pdserve.engine.kv_export import PrefillEndedEarly, export_kv
from pdserve.kvwire.chunk_message import encode_chunk_message
from pdserve.kvwire.codec import Encoding
from pdserve.kvwire.stream import FirstToken, KVHeader
from pdserve.logs import request_scope
from pdserve.metrics import WorkerMetrics

log = logging.getLogger(__name__)


class PrefillServicer(worker_pb2_grpc.PrefillWorkerServicer):
    service_name = "pdserve.v1.PrefillWorker"

    def __init__(self, config: WorkerConfig) -> None:
        self.config = config
        self.engine: AsyncEngine = None  # type: ignore[assignment]  # set by attach()
        self.metrics: WorkerMetrics = None  # type: ignore[assignment]
        self._calls = 0

    def register(self, server: grpc.aio.Server) -> None:
        add_prefill_servicer(self, server)

    def kv_link(self) -> tuple[float, int]:
        return 0.0, 0  # a prefill worker receives no KV

    def attach(self, engine: AsyncEngine, metrics: WorkerMetrics) -> None:
        """The model is loaded: start serving."""
        self.engine, self.metrics = engine, metrics

    async def Prefill(self, request: worker_pb2.PrefillRequest,  # noqa: N802 - gRPC name
                      context: grpc.aio.ServicerContext,
                      ) -> AsyncIterator[worker_pb2.PrefillResponse | bytes]:
        with request_scope(request.request_id):
            if self.engine is None:
                await context.abort(grpc.StatusCode.UNAVAILABLE,
                                    "prefill worker: model still loading")
            try:
                kv_request = kv_request_from_pb(request)
            except ValueError as e:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
            # The engine's id is this call's own: a retry or a relayed copy of the same
            # request may arrive while an earlier call of it is still being torn down.
            self._calls += 1
            kv_request = dataclasses.replace(
                kv_request, request_id=f"{kv_request.request_id}#{self._calls}")
            log.info("prefill started", extra={"prompt_tokens": len(kv_request.prompt),
                                               "encoding": kv_request.encoding.name})
            stream = _Sent()
            try:
                async for event in export_kv(self.engine, kv_request):
                    yield self._message(event, stream)
            except ValueError as e:  # the engine refused the prompt
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
            except PrefillEndedEarly as e:  # this worker's own failure: the caller may retry
                await context.abort(grpc.StatusCode.UNAVAILABLE, str(e))
            finally:
                log.info("prefill done", extra={"chunks": stream.chunks, "bytes": stream.bytes,
                                                "first_token": stream.done})

    def _message(self, event: KVHeader | KVPiece | FirstToken,
                 stream: _Sent) -> worker_pb2.PrefillResponse | bytes:
        if isinstance(event, KVHeader):
            stream.encoding = event.encoding
            return event_to_pb(event)
        if isinstance(event, KVPiece):
            stream.t_first = stream.t_first or time.perf_counter()
            message, nbytes = encode_chunk_message(stream.chunks, event.layer, event.start,
                                                   event.k, event.v, stream.encoding)
            stream.chunks += 1
            stream.bytes += nbytes
            self.metrics.kv_bytes.inc(nbytes)
            return message
        self.metrics.prompt_tokens.inc(event.num_prompt_tokens)
        if stream.t_first is not None:
            self.metrics.kv_seconds.observe(time.perf_counter() - stream.t_first)
        stream.done = True
        return event_to_pb(event)


class _Sent:
    """What one Prefill call has sent so far."""

    def __init__(self) -> None:
        self.encoding = Encoding.MODEL
        self.chunks = 0  # also the next chunk's seq
        self.bytes = 0
        self.t_first: float | None = None
        self.done = False


def add_prefill_servicer(servicer: worker_pb2_grpc.PrefillWorkerServicer,
                         server: grpc.aio.Server) -> None:
    """Register ``servicer`` like the generated helper does, except that the response
    stream also takes pre-serialized messages (the KV chunks, see convert.py)."""
    handler = grpc.unary_stream_rpc_method_handler(
        servicer.Prefill, request_deserializer=worker_pb2.PrefillRequest.FromString,
        response_serializer=response_bytes)
    server.add_generic_rpc_handlers(
        [grpc.method_handlers_generic_handler("pdserve.v1.PrefillWorker", {"Prefill": handler})])
