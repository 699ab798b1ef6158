"""The router's side of the decode workers' gRPC API: the one place where the
router's domain meets ``worker_pb2``.

``DecodeClients.generate`` opens one ``DecodeWorker.Generate`` call and hands back
a ``DecodeCall``: an async iterator of ``DecodeDelta`` that can be cancelled from
elsewhere (``Abort``). gRPC failures surface as ``WorkerError`` with the status
name, so the domain code never sees grpc types either.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pdserve._proto.pdserve.v1 import worker_pb2, worker_pb2_grpc
from pdserve.grpc_server import OPTIONS
from pdserve.logprobs import Logprob
from pdserve.params_pb import logprob_from_pb, params_to_pb
from pdserve.sampling_params import SamplingParams


@dataclass
class DecodeDelta:
    token_ids: list[int]
    text: str
    logprobs: list[Logprob]
    finish_reason: str
    # Set on the first delta: how the prompt's KV arrived.
    prefill_compute_s: float = 0.0
    kv_transfer_s: float = 0.0
    kv_bytes: int = 0


class WorkerError(Exception):
    """A decode worker's call ended with a gRPC status other than OK."""

    def __init__(self, code: str, details: str) -> None:
        super().__init__(details)
        self.code, self.details = code, details


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
                                  msg.kv_bytes)
        except grpc.aio.AioRpcError as e:
            raise WorkerError(e.code().name, e.details() or "") from e
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if not self._cancelled or (task is not None and task.cancelling()):
                raise  # our own task is being cancelled, not just this call
            raise WorkerError("CANCELLED", "cancelled by the router") from None


class DecodeClients:
    """One channel per decode worker address, opened on first use."""

    def __init__(self) -> None:
        self._channels: dict[str, grpc.aio.Channel] = {}

    def _channel(self, address: str) -> grpc.aio.Channel:
        if address not in self._channels:
            self._channels[address] = grpc.aio.insecure_channel(address, options=OPTIONS)
        return self._channels[address]

    def generate(self, address: str, request_id: str, prompt: list[int], params: SamplingParams,
                 prefill_address: str | None, kv_encoding: int,
                 timeout: float | None) -> DecodeCall:
        req = worker_pb2.DecodeRequest(
            request_id=request_id, prompt_token_ids=prompt, params=params_to_pb(params),
            plan=worker_pb2.PLAN_REMOTE if prefill_address else worker_pb2.PLAN_LOCAL,
            prefill_address=prefill_address or "",
            encoding=kv_encoding)  # type: ignore[arg-type]
        stub = worker_pb2_grpc.DecodeWorkerStub(self._channel(address))
        return DecodeCall(stub.Generate(req, timeout=timeout))

    async def is_serving(self, address: str, timeout: float) -> bool | None:
        """True/False: the worker answered SERVING or not; None: no answer in time."""
        stub = health_pb2_grpc.HealthStub(self._channel(address))
        try:
            r = await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout)
        except grpc.aio.AioRpcError as e:
            return None if e.code() == grpc.StatusCode.DEADLINE_EXCEEDED else False
        return bool(r.status == health_pb2.HealthCheckResponse.SERVING)

    async def close(self) -> None:
        for ch in self._channels.values():
            await ch.close()
        self._channels.clear()
