"""The gRPC ``DecodeBackend`` (router/decode_backend.py): the one place where the
router's domain meets ``worker_pb2``.

``DecodeClients.generate`` opens one ``DecodeWorker.Generate`` call and wraps it
in a ``DecodeCall``; gRPC failures surface as ``WorkerError`` with the status
name and the role the call's trailing metadata blames, so the domain code never
sees grpc types either.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pdserve._proto.pdserve.v1 import common_pb2, worker_pb2, worker_pb2_grpc
from pdserve.config import TLSConfig
from pdserve.grpc_server import OPTIONS
from pdserve.params_pb import logprob_from_pb, params_to_pb
from pdserve.tls import aio_channel
from pdserve.worker_errors import failed_role
from pdserve.worker_state import WorkerLoad
from router.decode_backend import DecodeDelta, DecodeJob, WorkerError


class DecodeCall:
    def __init__(self, call: grpc.aio.UnaryStreamCall) -> None:
        self._call = call
        self._cancelled = False

    def cancel(self) -> None:
        self._cancelled = True
        self._call.cancel()

    async def __aiter__(self) -> AsyncIterator[DecodeDelta]:
        try:
            async for msg in self._call:
                yield DecodeDelta(list(msg.token_ids), msg.text,
                                  [logprob_from_pb(lp) for lp in msg.logprobs],
                                  msg.finish_reason, msg.prefill_compute_s, msg.kv_transfer_s,
                                  msg.kv_bytes, msg.num_cached_tokens)
        except grpc.aio.AioRpcError as e:
            raise WorkerError(e.code().name, e.details() or "",
                              failed_role(e.trailing_metadata())) from e
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if not self._cancelled or (task is not None and task.cancelling()):
                raise  # our own task is being cancelled, not just this call
            raise WorkerError("CANCELLED", "cancelled by the router") from None


def _job_to_pb(job: DecodeJob) -> worker_pb2.DecodeRequest:
    return worker_pb2.DecodeRequest(
        request_id=job.request_id, prompt_token_ids=job.prompt, params=params_to_pb(job.params),
        plan=worker_pb2.PLAN_REMOTE if job.prefill_address else worker_pb2.PLAN_LOCAL,
        prefill_address=job.prefill_address or "",
        fallback_prefill_addresses=job.fallback_prefill if job.prefill_address else (),
        encoding=job.kv_encoding)  # type: ignore[arg-type]


class DecodeClients:
    """One channel per decode worker address, opened on first use; mTLS with the
    router's certificate when ``tls`` is set."""

    def __init__(self, tls: TLSConfig | None = None) -> None:
        self._tls = tls
        self._channels: dict[str, grpc.aio.Channel] = {}

    def _channel(self, address: str) -> grpc.aio.Channel:
        if address not in self._channels:
            self._channels[address] = aio_channel(address, self._tls, OPTIONS)
        return self._channels[address]

    def generate(self, address: str, job: DecodeJob) -> DecodeCall:
        stub = worker_pb2_grpc.DecodeWorkerStub(self._channel(address))
        return DecodeCall(stub.Generate(_job_to_pb(job), timeout=job.timeout))

    async def is_serving(self, address: str, timeout: float) -> bool | None:
        """True/False: the worker answered SERVING or not; None: no answer in time."""
        stub = health_pb2_grpc.HealthStub(self._channel(address))
        try:
            r = await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout)
        except grpc.aio.AioRpcError as e:
            return None if e.code() == grpc.StatusCode.DEADLINE_EXCEEDED else False
        return bool(r.status == health_pb2.HealthCheckResponse.SERVING)

    async def get_state(self, address: str, timeout: float) -> WorkerLoad | None:
        stub = worker_pb2_grpc.WorkerStateStub(self._channel(address))
        try:
            r = await stub.GetState(worker_pb2.WorkerStateRequest(prefix_summary=True),
                                    timeout=timeout)
        except grpc.aio.AioRpcError:
            return None
        return _load_from_pb(r)

    async def close(self) -> None:
        for ch in self._channels.values():
            await ch.close()
        self._channels.clear()


_MAX_BLOCK_SIZE = 1024
_MAX_SALT = 64
_ENCODINGS = set(common_pb2.KVEncoding.values())
# The reply's float fields, each a WorkerLoad field of the same name: finite, >= 0.
_RATES = ("prefill_tokens_per_s", "decode_step_s", "kv_link_bytes_per_s",
          "decode_step_budget_s", "kv_bytes_per_token")


def _load_from_pb(r: worker_pb2.WorkerStateReply) -> WorkerLoad | None:
    """A worker's state; None for one no worker could be in (the worker is then
    treated as if it had not answered)."""
    rates = {name: getattr(r, name) for name in _RATES}
    by_encoding = dict(r.kv_bytes_per_token_by_encoding)
    if not (1 <= r.block_size <= _MAX_BLOCK_SIZE and r.num_free_blocks <= r.num_blocks
            and len(r.cached_blocks) <= r.num_blocks and len(r.prefix_salt) <= _MAX_SALT
            and all(math.isfinite(x) and x >= 0 for x in rates.values())
            and set(by_encoding) <= _ENCODINGS
            and all(math.isfinite(x) and x > 0 for x in by_encoding.values())):
        return None
    return WorkerLoad(r.role, r.num_running, r.num_waiting, r.pending_prefill_tokens,
                      r.num_free_blocks, r.num_blocks, r.block_size,
                      prefix_salt=bytes(r.prefix_salt), cached_blocks=frozenset(r.cached_blocks),
                      seq=r.state_seq, kv_bytes_per_token_by_encoding=by_encoding,
                      kv_pending_bytes=r.kv_pending_bytes, **rates)
