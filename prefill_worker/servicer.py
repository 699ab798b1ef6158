"""``PrefillWorker.Prefill``: header, then KV chunks as each layer is computed, then
the first token.

Per request: RECEIVED → (queued in the engine) → PREFILLING (chunks streamed as
layers finish) → FIRST_TOKEN sent → DONE. A cancelled call aborts the request in
the engine, which frees its blocks.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import AsyncIterator

import grpc

from pdserve._proto.pdserve.v1 import worker_pb2, worker_pb2_grpc
from pdserve.config import WorkerConfig
from pdserve.convert import header_to_pb, response_bytes
from pdserve.engine.async_engine import AsyncEngine, KVPiece
from pdserve.kvwire.chunk_message import encode_chunk_message
from pdserve.kvwire.codec import Encoding, resolve
from pdserve.kvwire.stream import PROTOCOL_VERSION, KVHeader
from pdserve.logprobs import Logprob
from pdserve.metrics import WorkerMetrics
from pdserve.params_pb import logprob_to_pb, params_from_pb
from pdserve.sampling_params import SamplingParams

log = logging.getLogger(__name__)


class PrefillServicer(worker_pb2_grpc.PrefillWorkerServicer):
    service_name = "pdserve.v1.PrefillWorker"

    def __init__(self, config: WorkerConfig) -> None:
        self.config = config
        self.engine: AsyncEngine = None  # type: ignore[assignment]  # set by attach()
        self.metrics: WorkerMetrics = None  # type: ignore[assignment]

    def register(self, server: grpc.aio.Server) -> None:
        add_prefill_servicer(self, server)

    def attach(self, engine: AsyncEngine, metrics: WorkerMetrics) -> None:
        """The model is loaded: start serving."""
        self.engine, self.metrics = engine, metrics

    async def Prefill(self, request: worker_pb2.PrefillRequest,  # noqa: N802 - gRPC name
                      context: grpc.aio.ServicerContext,
                      ) -> AsyncIterator[worker_pb2.PrefillResponse | bytes]:
        rid = request.request_id
        if self.engine is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "prefill worker: model still loading")
        try:
            params = params_from_pb(request.params)
            enc = resolve(Encoding(request.encoding), self.engine.engine.weight_dtype)
        except ValueError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        # Only the first token is sampled here; the decode worker does the rest.
        params = _first_token_only(params)
        prompt = list(request.prompt_token_ids)
        yield worker_pb2.PrefillResponse(header=header_to_pb(self._header(enc, len(prompt))))
        seq, sent, t_first = 0, 0, None
        try:
            async for item in self.engine.generate(rid, prompt, params, export_kv=True):
                if isinstance(item, KVPiece):
                    t_first = t_first or time.perf_counter()
                    message, nbytes = encode_chunk_message(seq, item.layer, item.start,
                                                           item.k, item.v, enc)
                    seq += 1
                    sent += nbytes
                    self.metrics.kv_bytes.inc(nbytes)
                    yield message
                elif item.finished:
                    self.metrics.prompt_tokens.inc(len(prompt))
                    if t_first is not None:
                        self.metrics.kv_seconds.observe(time.perf_counter() - t_first)
                    yield worker_pb2.PrefillResponse(first_token=_first_token(item, prompt))
        except ValueError as e:  # the engine refused the prompt
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        finally:
            log.info("prefill done", extra={"request_id": rid, "chunks": seq, "bytes": sent})

    def _header(self, enc: Encoding, num_tokens: int) -> KVHeader:
        s = self.engine.engine.spec
        return KVHeader(PROTOCOL_VERSION, s.name, s.num_layers, s.num_kv_heads, s.head_dim,
                        self.engine.engine.blocks.block_size, enc, num_tokens)


def add_prefill_servicer(servicer: worker_pb2_grpc.PrefillWorkerServicer,
                         server: grpc.aio.Server) -> None:
    """Register ``servicer`` like the generated helper does, except that the response
    stream also takes pre-serialized messages (the KV chunks, see convert.py)."""
    handler = grpc.unary_stream_rpc_method_handler(
        servicer.Prefill, request_deserializer=worker_pb2.PrefillRequest.FromString,
        response_serializer=response_bytes)
    server.add_generic_rpc_handlers(
        [grpc.method_handlers_generic_handler("pdserve.v1.PrefillWorker", {"Prefill": handler})])


def _first_token_only(params: SamplingParams) -> SamplingParams:
    return dataclasses.replace(params, max_tokens=1, min_tokens=min(params.min_tokens, 1),
                               stop=(), detokenize=False)


def _first_token(out, prompt: list[int]) -> worker_pb2.FirstToken:  # type: ignore[no-untyped-def]
    t = out.timings
    lp = out.logprobs[0] if out.logprobs else Logprob(out.token_ids[0], 0.0, [])
    compute = 0.0
    if t is not None and t.ttft_s is not None and t.queue_s is not None:
        compute = t.ttft_s - t.queue_s
    return worker_pb2.FirstToken(token=logprob_to_pb(lp), prefill_compute_s=compute,
                                 num_prompt_tokens=len(prompt))
