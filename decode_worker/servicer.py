"""``DecodeWorker.Generate``: admit, get the KV (remote or local), decode, stream.

Per request: ADMITTED (KV blocks for the prompt reserved, else RESOURCE_EXHAUSTED)
→ RECEIVING KV from the prefill worker (plan REMOTE; see kv_receiver) or
PREFILLING itself (plan LOCAL, or REMOTE whose prefill worker turned out
unreachable or died mid-transfer, with ``prefill_fallback: local``) → DECODING
in the continuous batch → DONE. A cancelled call, a failed transfer or an expired
deadline aborts the request in the engine, which frees its blocks, and ends the
call with a status.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import grpc

from decode_worker.kv_receiver import PrefillClients, TransferStats, receive_kv
from pdserve._proto.pdserve.v1 import worker_pb2, worker_pb2_grpc
from pdserve.config import WorkerConfig
from pdserve.engine.async_engine import AsyncEngine
from pdserve.engine.block_manager import NoFreeBlocksError
from pdserve.engine.outputs import RequestOutput
from pdserve.kvwire.codec import Encoding, resolve
from pdserve.kvwire.stream import KVStreamError
from pdserve.metrics import WorkerMetrics
from pdserve.params_pb import logprob_to_pb, params_from_pb
from pdserve.sampling_params import SamplingParams

log = logging.getLogger(__name__)


class DecodeServicer(worker_pb2_grpc.DecodeWorkerServicer):
    service_name = "pdserve.v1.DecodeWorker"

    def __init__(self, config: WorkerConfig) -> None:
        self.engine: AsyncEngine = None  # type: ignore[assignment]  # set by attach()
        self.metrics: WorkerMetrics = None  # type: ignore[assignment]
        self.config = config
        self.clients = PrefillClients()
        self.default_encoding = Encoding.parse(config.kv_encoding)

    def register(self, server: grpc.aio.Server) -> None:
        worker_pb2_grpc.add_DecodeWorkerServicer_to_server(self, server)

    def attach(self, engine: AsyncEngine, metrics: WorkerMetrics) -> None:
        """The model is loaded: start serving."""
        self.engine, self.metrics = engine, metrics

    async def Generate(self, request: worker_pb2.DecodeRequest,  # noqa: N802 - gRPC name
                       context: grpc.aio.ServicerContext) -> AsyncIterator[worker_pb2.DecodeResponse]:
        rid, prompt = request.request_id, list(request.prompt_token_ids)
        if self.engine is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "decode worker: model still loading")
        try:
            params = params_from_pb(request.params)
        except ValueError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        remote = request.plan == worker_pb2.PLAN_REMOTE or (
            request.plan == worker_pb2.PLAN_UNSPECIFIED and bool(request.prefill_address))
        if remote and not request.prefill_address:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                "plan REMOTE needs prefill_address")
        if remote:
            stream = self._remote(request, prompt, params, context)
        else:
            stream = self._local(rid, prompt, params, context)
        async for msg in stream:
            yield msg

    async def _local(self, rid: str, prompt: list[int], params: SamplingParams,
                     context: grpc.aio.ServicerContext) -> AsyncIterator[worker_pb2.DecodeResponse]:
        first = True
        try:
            async for out in self.engine.generate(rid, prompt, params):
                assert isinstance(out, RequestOutput)
                msg = _response(out)
                if first:
                    self.metrics.prompt_tokens.inc(len(prompt))  # prefilled here
                    msg.prefill_compute_s = _local_compute_s(out)
                first = False
                self._count(out)
                yield msg
        except ValueError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))

    async def _remote(self, request: worker_pb2.DecodeRequest, prompt: list[int],
                      params: SamplingParams, context: grpc.aio.ServicerContext,
                      ) -> AsyncIterator[worker_pb2.DecodeResponse]:
        rid, engine = request.request_id, self.engine
        enc = resolve(Encoding(request.encoding) if request.encoding else self.default_encoding,
                      engine.engine.weight_dtype)
        q = engine.open(rid)
        finished = False
        try:
            await self._admit(rid, prompt, params, context)
            stats = await self._transfer(request, rid, prompt, params, enc, context)
            first = True
            async for out in engine.stream(q):
                assert isinstance(out, RequestOutput)
                finished = out.finished
                msg = _response(out)
                if first and stats is None:  # fell back to a local prefill
                    self.metrics.prompt_tokens.inc(len(prompt))
                    msg.prefill_compute_s = _local_compute_s(out)
                elif first and stats is not None:
                    msg.prefill_compute_s, msg.kv_transfer_s = stats.prefill_compute_s, stats.transfer_s
                    msg.kv_bytes = stats.bytes
                first = False
                self._count(out)
                yield msg
        finally:
            engine.close(rid, finished)
            if not finished:
                self.metrics.aborted.inc()

    def _count(self, out: RequestOutput) -> None:
        self.metrics.generation_tokens.inc(len(out.new_token_ids))
        if out.finished and out.timings is not None:
            self.metrics.preemptions.inc(out.timings.num_preemptions)

    async def _admit(self, rid: str, prompt: list[int], params: SamplingParams,
                     context: grpc.aio.ServicerContext) -> None:
        try:
            await self.engine.call(self.engine.engine.begin_import, rid, prompt, params)
        except NoFreeBlocksError as e:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"decode worker full: {e}")
        except ValueError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))

    async def _transfer(self, request: worker_pb2.DecodeRequest, rid: str, prompt: list[int],
                        params: SamplingParams, enc: Encoding,
                        context: grpc.aio.ServicerContext) -> TransferStats | None:
        """The prompt's KV from the prefill worker; None when it was unreachable or died
        and the prompt is being prefilled here instead (``prefill_fallback: local``)."""
        address = request.prefill_address
        remaining = context.time_remaining()
        timeout = remaining if remaining is not None else self.config.prefill_timeout_s
        try:
            stats = await receive_kv(self.engine, self.clients, address, rid, prompt, params,
                                     enc, timeout)
        except KVStreamError as e:
            self.metrics.kv_failures.inc()
            await context.abort(getattr(grpc.StatusCode, e.code), f"KV from {address}: {e}")
        except grpc.aio.AioRpcError as e:
            self.metrics.kv_failures.inc()
            code = e.code()
            if code == grpc.StatusCode.CANCELLED:
                raise
            if code == grpc.StatusCode.UNAVAILABLE and self.config.prefill_fallback == "local":
                log.warning("prefill worker unavailable, prefilling locally",
                            extra={"request_id": rid, "prefill": address,
                                   "error": e.details()})
                await self.engine.call(self.engine.engine.prefill_locally, rid)
                return None
            await context.abort(code, f"prefill worker {address}: {e.details()}")
        self.metrics.kv_bytes.inc(stats.bytes)
        self.metrics.kv_seconds.observe(stats.transfer_s)
        self.metrics.prompt_tokens.inc(len(prompt))
        return stats


def _local_compute_s(out: RequestOutput) -> float:
    t = out.timings
    if t is None or t.ttft_s is None:
        return 0.0
    return t.ttft_s - (t.queue_s or 0.0)


def _response(out: RequestOutput) -> worker_pb2.DecodeResponse:
    return worker_pb2.DecodeResponse(
        token_ids=out.new_token_ids, text=out.new_text,
        finish_reason=out.finish_reason or "" if out.finished else "",
        logprobs=[logprob_to_pb(lp) for lp in out.new_logprobs],
        stop_reason="" if out.stop_reason is None else str(out.stop_reason))
