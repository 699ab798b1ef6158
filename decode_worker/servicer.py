"""``DecodeWorker.Generate``: the lifecycle of a decode request.

One path for every plan; a REMOTE plan puts a KV import in front of decoding. The
import's states are those of pdserve/engine/kv_import.py::

    PLANNED ──▶ ADMITTED ──(LOCAL: prefill here)──────────────────────────▶ DECODING ──▶ DONE
                   │                                                           ▲
                   └─(REMOTE: KV import) RESERVED ──▶ RECEIVING ──┬─ COMMITTED ─┤
                                                                  ├─ FELL_BACK ─┘ (prefill here)
                                                                  └─ ABORTED ──▶ call fails

- PLANNED: the protobuf request converted and checked (params, plan, prefill
  address, encoding; else INVALID_ARGUMENT) into a ``DecodePlan``; a prefill address
  outside the worker's allowlist (decode_worker/prefill_allowlist.py) is refused with
  PERMISSION_DENIED, never dialled.
- ADMITTED: the request has its seat in the engine (``RequestStream``). LOCAL: queued
  for a prefill here. REMOTE: blocks for the prompt's KV reserved (else
  RESOURCE_EXHAUSTED): the import is RESERVED.
- RECEIVING: the KV comes from the prefill worker through the ``KVSource``
  (decode_worker/kv_source.py), checked and written into the reserved blocks.
  COMMITTED: the first token arrived, the request decodes. FELL_BACK: the prefill
  worker was unreachable or died and ``prefill_fallback`` is ``local``: the prompt is
  prefilled here. ABORTED: the call ends with the stream's status
  (FAILED_PRECONDITION, DATA_LOSS, INVALID_ARGUMENT, or the peer's own).
- DECODING: in the continuous batch; tokens stream back, the first message says how
  the prompt's KV arrived. DONE: the final output (finish reason) was sent.

A cancelled call, an expired deadline or any error aborts the request in the engine
(leaving its ``RequestStream``), which frees its blocks. Every line logged while
serving a request carries its id: admitted (plan, prefill address), KV import failed
or fell back, done (finish reason, output tokens).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc

from decode_worker.kv_source import KVSource, make_kv_source
from decode_worker.prefill_allowlist import PrefillAllowlist
from pdserve._proto.pdserve.v1 import worker_pb2, worker_pb2_grpc
from pdserve.config import WorkerConfig
from pdserve.engine.async_engine import AsyncEngine, RequestStream
from pdserve.engine.block_manager import NoFreeBlocksError
from pdserve.engine.kv_import import ImportState, KVImport
from pdserve.engine.outputs import RequestOutput
from pdserve.kvwire.codec import Encoding
from pdserve.kvwire.stream import KVRequest, KVStreamError
from pdserve.logs import request_scope
from pdserve.metrics import WorkerMetrics
from pdserve.params_pb import logprob_to_pb, params_from_pb

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DecodePlan:
    """The checked request, and where its prompt's KV comes from: computed here
    (``prefill_address`` None) or imported from that prefill worker."""

    kv: KVRequest
    prefill_address: str | None

    @property
    def name(self) -> str:
        return "remote" if self.prefill_address else "local"


class DecodeServicer(worker_pb2_grpc.DecodeWorkerServicer):
    service_name = "pdserve.v1.DecodeWorker"

    def __init__(self, config: WorkerConfig) -> None:
        self.engine: AsyncEngine = None  # type: ignore[assignment]  # set by attach()
        self.metrics: WorkerMetrics = None  # type: ignore[assignment]
        self.kv_source: KVSource = None  # type: ignore[assignment]
        self.config = config
        self.default_encoding = Encoding.parse(config.kv_encoding)
        self.allowlist = PrefillAllowlist.of(config)

    def register(self, server: grpc.aio.Server) -> None:
        worker_pb2_grpc.add_DecodeWorkerServicer_to_server(self, server)

    def attach(self, engine: AsyncEngine, metrics: WorkerMetrics) -> None:
        """The model is loaded: start serving."""
        self.kv_source = make_kv_source(self.config.kv_source, engine, self.config.tls)
        self.engine, self.metrics = engine, metrics

    async def Generate(self, request: worker_pb2.DecodeRequest,  # noqa: N802 - gRPC name
                       context: grpc.aio.ServicerContext) -> AsyncIterator[worker_pb2.DecodeResponse]:
        with request_scope(request.request_id):
            if self.engine is None:
                await context.abort(grpc.StatusCode.UNAVAILABLE,
                                    "decode worker: model still loading")
            plan = await self._plan(request, context)
            last: RequestOutput | None = None
            try:
                async with self.engine.request(plan.kv.request_id) as stream:
                    kv_import = await self._admit(stream, plan, context)
                    async for out in stream.outputs():
                        assert isinstance(out, RequestOutput)
                        yield self._response(out, first=last is None, kv_import=kv_import)
                        last = out
            finally:
                self._end(last, plan)

    async def _plan(self, request: worker_pb2.DecodeRequest,
                    context: grpc.aio.ServicerContext) -> DecodePlan:
        """PLANNED: the protobuf request as a checked plan."""
        try:
            params = params_from_pb(request.params)
            encoding = Encoding(request.encoding) if request.encoding else self.default_encoding
        except ValueError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        remote = request.plan == worker_pb2.PLAN_REMOTE or (
            request.plan == worker_pb2.PLAN_UNSPECIFIED and bool(request.prefill_address))
        if remote and not request.prefill_address:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                "plan REMOTE needs prefill_address")
        if remote and not self.allowlist.permits(request.prefill_address):
            await context.abort(grpc.StatusCode.PERMISSION_DENIED,
                                f"prefill_address {request.prefill_address!r} is not a prefill "
                                "worker this decode worker may dial (--prefill-allowlist)")
        if request.request_id in self.engine.open_requests:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"request_id {request.request_id!r} is already in use")
        kv = KVRequest(request.request_id, list(request.prompt_token_ids), params, encoding)
        return DecodePlan(kv, request.prefill_address if remote else None)

    async def _admit(self, stream: RequestStream, plan: DecodePlan,
                     context: grpc.aio.ServicerContext) -> KVImport | None:
        """ADMITTED; for a remote plan, the KV import then runs to COMMITTED or
        FELL_BACK (ABORTED ends the call). Returns that import."""
        kv = plan.kv
        try:
            if plan.prefill_address is None:
                await stream.add(kv.prompt, kv.params)
            else:
                kv_import = await stream.reserve_import(kv.prompt, kv.params, kv.encoding)
        except NoFreeBlocksError as e:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"decode worker full: {e}")
        except ValueError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        log.info("admitted", extra={"plan": plan.name, "prefill": plan.prefill_address,
                                    "prompt_tokens": len(kv.prompt)})
        if plan.prefill_address is None:
            return None
        await self._import(kv_import, plan, context)
        return kv_import

    async def _import(self, kv_import: KVImport, plan: DecodePlan,
                      context: grpc.aio.ServicerContext) -> None:
        address = plan.prefill_address
        assert address is not None
        remaining = context.time_remaining()
        timeout = remaining if remaining is not None else self.config.prefill_timeout_s
        events = self.kv_source.prefill(address, plan.kv, timeout)
        try:
            await kv_import.run(events, fall_back=self.config.prefill_fallback == "local")
        except KVStreamError as e:
            self.metrics.kv_failures.inc()
            log.warning("KV import failed", extra={"prefill": address, "code": e.code,
                                                   "error": str(e)})
            await context.abort(getattr(grpc.StatusCode, e.code), f"KV from {address}: {e}")
        if kv_import.state is ImportState.FELL_BACK:
            self.metrics.kv_failures.inc()
            log.warning("prefill worker unavailable, prefilling locally",
                        extra={"prefill": address, "error": str(kv_import.error)})
            return
        self.metrics.kv_bytes.inc(kv_import.stats.bytes)
        self.metrics.kv_seconds.observe(kv_import.stats.transfer_s)

    def _response(self, out: RequestOutput, first: bool,
                  kv_import: KVImport | None) -> worker_pb2.DecodeResponse:
        msg = worker_pb2.DecodeResponse(
            token_ids=out.new_token_ids, text=out.new_text,
            finish_reason=out.finish_reason or "" if out.finished else "",
            logprobs=[logprob_to_pb(lp) for lp in out.new_logprobs],
            stop_reason="" if out.stop_reason is None else str(out.stop_reason))
        self.metrics.generation_tokens.inc(len(out.new_token_ids))
        if out.finished and out.timings is not None:
            self.metrics.preemptions.inc(out.timings.num_preemptions)
        if first:  # the prompt is in the KV cache now, whichever way it got there
            self.metrics.prompt_tokens.inc(len(out.prompt_token_ids))
            if kv_import is not None and kv_import.state is ImportState.COMMITTED:
                s = kv_import.stats
                msg.prefill_compute_s, msg.kv_transfer_s = s.prefill_compute_s, s.transfer_s
                msg.kv_bytes = s.bytes
            else:
                msg.prefill_compute_s = _local_compute_s(out)
        return msg

    def _end(self, last: RequestOutput | None, plan: DecodePlan) -> None:
        """DONE, or cut short (cancelled, failed): the end line either way."""
        if last is None or not last.finished:
            self.metrics.aborted.inc()
        reason = last.finish_reason if last is not None and last.finished else "abort"
        tokens = len(last.token_ids) if last is not None else 0
        log.info("done", extra={"plan": plan.name, "finish_reason": reason,
                                "output_tokens": tokens})


def _local_compute_s(out: RequestOutput) -> float:
    t = out.timings
    if t is None or t.ttft_s is None:
        return 0.0
    return t.ttft_s - (t.queue_s or 0.0)
