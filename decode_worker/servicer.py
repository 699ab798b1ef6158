"""``DecodeWorker.Generate``: the lifecycle of a decode request.

One path for every plan; a REMOTE plan puts a KV import in front of decoding. The
import's states are those of pdserve/engine/kv_import.py::

    PLANNED ──▶ ADMITTED ──(LOCAL: prefill here)──────────────────────────▶ DECODING ──▶ DONE
                   │                                                           ▲
                   └─(REMOTE: KV import) RESERVED ──▶ RECEIVING ──┬─ COMMITTED ─┤
                                     ▲ next prefill worker  │     ├─ FELL_BACK ─┘ (prefill here)
                                     └──────────────────────┘     └─ ABORTED ──▶ call fails

- PLANNED: the protobuf request converted and checked (params, plan, prefill
  addresses, encoding; else INVALID_ARGUMENT) into a ``DecodePlan``. Its prefill
  candidates are ``prefill_address`` then ``fallback_prefill_addresses`` (the
  router's order), at most ``MAX_PREFILL_CANDIDATES``; a candidate outside the
  worker's allowlist (decode_worker/prefill_allowlist.py) is refused with
  PERMISSION_DENIED, never dialled.
- ADMITTED: the request has its seat in the engine (``RequestStream``). LOCAL: queued
  for a prefill here. REMOTE: blocks for the prompt's KV reserved (else
  RESOURCE_EXHAUSTED): the import is RESERVED.
- RECEIVING: the KV comes from a prefill worker through the ``KVSource``
  (decode_worker/kv_source.py), checked and written into the reserved blocks.
  A candidate that fails by its own fault (unreachable, died, silent for
  ``kv_idle_timeout_s`` without answering its health probe, RESOURCE_EXHAUSTED,
  message too large) hands over to the next (RECEIVING again, same blocks).
  COMMITTED: the first token arrived, the request decodes. FELL_BACK: every
  candidate failed that way and ``prefill_fallback`` is ``local``: the prompt is
  prefilled here. ABORTED: the call
  ends with the stream's status: hostile data (FAILED_PRECONDITION, DATA_LOSS,
  INVALID_ARGUMENT, never retried) or the peer's own; or UNAVAILABLE naming every
  candidate when they all failed and ``prefill_fallback`` is ``fail``. Every
  failure a prefill worker caused carries trailing metadata blaming the prefill
  role (pdserve/worker_errors.py), so the router never reads it as this worker's
  own RESOURCE_EXHAUSTED ("decode worker full") or death.
- DECODING: in the continuous batch; tokens stream back, the first message says how
  the prompt's KV arrived. DONE: the final output (finish reason) was sent.

A cancelled call, an expired deadline or any error aborts the request in the engine
(leaving its ``RequestStream``), which frees its blocks. Every line logged while
serving a request carries its id: admitted (plan, prefill address), KV import failed
or fell back, done (finish reason, output tokens).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc

from decode_worker.kv_source import KVSource, make_kv_source
from decode_worker.link_rate import LinkRate
from decode_worker.prefill_allowlist import PrefillAllowlist
from pdserve._proto.pdserve.v1 import worker_pb2, worker_pb2_grpc
from pdserve.config import WorkerConfig
from pdserve.engine.async_engine import AsyncEngine, RequestStream
from pdserve.engine.block_manager import NoFreeBlocksError
from pdserve.engine.kv_import import PEER_FAULTS, ImportState, KVImport
from pdserve.engine.outputs import RequestOutput
from pdserve.kvwire.codec import Encoding
from pdserve.kvwire.stream import KVRequest, KVStreamError, PeerFailed
from pdserve.logs import request_scope
from pdserve.metrics import WorkerMetrics
from pdserve.params_pb import logprob_to_pb, params_from_pb
from pdserve.worker_errors import failed_role_metadata

log = logging.getLogger(__name__)

MAX_PREFILL_CANDIDATES = 8  # a request names at most this many prefill workers
_PROBE_TIMEOUT_S = 1.0  # a silent prefill worker must answer its health probe this fast
# A silent prefill worker that answers its health probe is busy (queued prefill) for
# this many idle timeouts at most; past that its stream is wedged and it has failed.
SILENT_PROBES = 3
_BLAME_PREFILL = failed_role_metadata("prefill")


@dataclass(frozen=True)
class DecodePlan:
    """The checked request, and where its prompt's KV comes from: computed here
    (no prefill addresses) or imported from the first of these prefill workers
    that delivers it."""

    kv: KVRequest
    prefill_addresses: tuple[str, ...] = ()

    @property
    def prefill_address(self) -> str | None:
        return self.prefill_addresses[0] if self.prefill_addresses else None

    @property
    def name(self) -> str:
        return "remote" if self.prefill_addresses else "local"




class DecodeServicer(worker_pb2_grpc.DecodeWorkerServicer):
    service_name = "pdserve.v1.DecodeWorker"

    def __init__(self, config: WorkerConfig) -> None:
        self.engine: AsyncEngine = None  # type: ignore[assignment]  # set by attach()
        self.metrics: WorkerMetrics = None  # type: ignore[assignment]
        self.kv_source: KVSource = None  # type: ignore[assignment]
        self.config = config
        self.default_encoding = Encoding.parse(config.kv_encoding)
        self.allowlist = PrefillAllowlist.of(config)
        self.link = LinkRate()  # over its recent transfers, overlapping ones together
        self._imports: set[KVImport] = set()  # reserved or receiving: the link's backlog

    def register(self, server: grpc.aio.Server) -> None:
        worker_pb2_grpc.add_DecodeWorkerServicer_to_server(self, server)

    def kv_link(self) -> tuple[float, int]:
        return self.link.bytes_per_s, sum(i.bytes_pending for i in list(self._imports))

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
        remote = request.plan == worker_pb2.PLAN_REMOTE or (
            request.plan == worker_pb2.PLAN_UNSPECIFIED and bool(request.prefill_address))
        try:
            params = params_from_pb(request.params)
            encoding = Encoding(request.encoding) if request.encoding else self.default_encoding
            candidates = _prefill_candidates(request) if remote else ()
        except ValueError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        refused = [a for a in candidates if not self.allowlist.permits(a)]
        if refused:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED,
                                f"prefill address {refused[0]!r} is not a prefill worker this "
                                "decode worker may dial (--prefill-allowlist)")
        if request.request_id in self.engine.open_requests:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"request_id {request.request_id!r} is already in use")
        kv = KVRequest(request.request_id, list(request.prompt_token_ids), params, encoding)
        return DecodePlan(kv, candidates)

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
        """RECEIVING from each candidate in turn, to COMMITTED or FELL_BACK; else the
        call ends with a status that names the prefill worker(s) and blames them."""
        remaining = context.time_remaining()
        timeout = remaining if remaining is not None else self.config.prefill_timeout_s
        # The prefill worker sends only what this worker's prefix cache lacks.
        kv = dataclasses.replace(plan.kv, num_cached_tokens=kv_import.num_cached_tokens)
        first, *rest = (self.kv_source.prefill(a, kv, timeout)
                        for a in plan.prefill_addresses)
        idle = self.config.kv_idle_timeout_s
        alive = [functools.partial(self.kv_source.is_alive, a, min(idle, _PROBE_TIMEOUT_S))
                 for a in plan.prefill_addresses]
        self._imports.add(kv_import)
        try:
            await kv_import.run(first, fall_back=self.config.prefill_fallback == "local",
                                retries=rest, idle_timeout_s=idle, still_alive=alive,
                                max_silent_s=SILENT_PROBES * idle)
        except KVStreamError as e:
            self._note_peer_failures(kv_import, plan)
            if e not in kv_import.failures:  # hostile data, or a status not the peer's fault
                self.metrics.kv_failures.inc()
            code, message = _import_failure(e, plan.prefill_addresses, kv_import.failures)
            log.warning("KV import failed", extra={"prefill": plan.prefill_addresses,
                                                   "code": code, "error": message})
            await context.abort(code, message, trailing_metadata=_BLAME_PREFILL)
        finally:
            self._imports.discard(kv_import)
        self._note_peer_failures(kv_import, plan)
        if kv_import.state is ImportState.FELL_BACK:
            log.warning("no prefill worker delivered, prefilling locally",
                        extra={"prefill": plan.prefill_addresses, "error": str(kv_import.error)})
            return
        stats = kv_import.stats
        self.metrics.kv_bytes.inc(stats.bytes)
        self.metrics.kv_seconds.observe(stats.transfer_s)
        now = time.perf_counter()  # the clock transfer_s was measured on
        self.link.record(now - stats.transfer_s, now, stats.bytes)

    def _note_peer_failures(self, kv_import: KVImport, plan: DecodePlan) -> None:
        """One failure counted and logged per candidate given up on the way."""
        for address, failure in zip(plan.prefill_addresses, kv_import.failures, strict=False):
            self.metrics.kv_failures.inc()
            log.warning("prefill worker failed the transfer",
                        extra={"prefill": address, "code": failure.code, "error": str(failure)})

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
                msg.kv_bytes, msg.num_cached_tokens = s.bytes, s.num_cached_tokens
            else:
                msg.prefill_compute_s = _local_compute_s(out)
                msg.num_cached_tokens = out.num_cached_tokens
        return msg

    def _end(self, last: RequestOutput | None, plan: DecodePlan) -> None:
        """DONE, or cut short (cancelled, failed): the end line either way."""
        if last is None or not last.finished:
            self.metrics.aborted.inc()
        reason = last.finish_reason if last is not None and last.finished else "abort"
        tokens = len(last.token_ids) if last is not None else 0
        log.info("done", extra={"plan": plan.name, "finish_reason": reason,
                                "output_tokens": tokens})


def _prefill_candidates(request: worker_pb2.DecodeRequest) -> tuple[str, ...]:
    """``prefill_address`` then the fallbacks, duplicates dropped; ValueError names
    the field of a bad one."""
    if not request.prefill_address:
        raise ValueError("plan REMOTE needs prefill_address")
    candidates = [request.prefill_address, *request.fallback_prefill_addresses]
    if len(candidates) > MAX_PREFILL_CANDIDATES:
        raise ValueError(f"fallback_prefill_addresses: at most {MAX_PREFILL_CANDIDATES - 1} "
                         f"addresses, got {len(candidates) - 1}")
    for a in candidates:
        if not 0 < len(a) <= 255:
            raise ValueError(f"fallback_prefill_addresses must be addresses of 1 to 255 "
                             f"characters, got {a[:64]!r}")
    return tuple(dict.fromkeys(candidates))


def _import_failure(e: KVStreamError, addresses: tuple[str, ...],
                    failures: list[PeerFailed]) -> tuple[grpc.StatusCode, str]:
    """The status of a failed import. Every candidate failed by its own fault (and no
    local fallback): UNAVAILABLE naming each, never the peer's RESOURCE_EXHAUSTED,
    which would read as this decode worker being full. Else the stream's status,
    naming the prefill worker it came from."""
    if isinstance(e, PeerFailed) and e.code in PEER_FAULTS:
        said = "; ".join(f"prefill worker {a}: {f.code}: {f}"
                         for a, f in zip(addresses, failures, strict=False))
        return grpc.StatusCode.UNAVAILABLE, f"no prefill worker delivered the KV ({said})"
    address = addresses[min(len(failures), len(addresses) - 1)]
    return getattr(grpc.StatusCode, e.code), f"prefill worker {address}: {e}"


def _local_compute_s(out: RequestOutput) -> float:
    t = out.timings
    if t is None or t.ttft_s is None:
        return 0.0
    return t.ttft_s - (t.queue_s or 0.0)
