"""``WorkerState.GetState`` on every worker: the one place its reply meets protobuf
(the router's side is router/decode_client.py). Answers from the serving thread
without waiting for the engine's step (pdserve/worker_state.py)."""

from __future__ import annotations

from collections.abc import Callable

import grpc

from pdserve._proto.pdserve.v1 import worker_pb2, worker_pb2_grpc
from pdserve.engine.async_engine import AsyncEngine
from pdserve.kvwire.codec import Encoding, bytes_per_token, resolve
from pdserve.worker_state import WorkerLoad, load_of

SERVICE_NAME = "pdserve.v1.WorkerState"


class WorkerStateServicer(worker_pb2_grpc.WorkerStateServicer):
    def __init__(self, role: str) -> None:
        self.role = role
        self.engine: AsyncEngine | None = None
        self.link_rate: Callable[[], float] = lambda: 0.0
        self.kv_bytes_per_token = 0

    def attach(self, engine: AsyncEngine, link_rate: Callable[[], float],
               kv_encoding: str) -> None:
        """Serve ``engine``'s state; ``kv_encoding``: this worker's default on the wire."""
        self.engine, self.link_rate = engine, link_rate
        e, s = engine.engine, engine.engine.spec
        wire = resolve(Encoding.parse(kv_encoding), e.weight_dtype)
        self.kv_bytes_per_token = bytes_per_token(wire, s.num_layers, s.num_kv_heads, s.head_dim)

    async def GetState(self, request: worker_pb2.WorkerStateRequest,  # noqa: N802 - gRPC name
                       context: grpc.aio.ServicerContext) -> worker_pb2.WorkerStateReply:
        if self.engine is None or self.engine.dead is not None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"{self.role} worker: no engine")
        load = load_of(self.engine.engine, self.role, self.link_rate(),  # type: ignore[union-attr]
                       request.prefix_summary, self.kv_bytes_per_token)
        return load_to_pb(load)


def load_to_pb(load: WorkerLoad) -> worker_pb2.WorkerStateReply:
    return worker_pb2.WorkerStateReply(
        role=load.role, num_running=load.num_running, num_waiting=load.num_waiting,
        pending_prefill_tokens=load.pending_prefill_tokens,
        num_free_blocks=load.num_free_blocks, num_blocks=load.num_blocks,
        block_size=load.block_size, prefill_tokens_per_s=load.prefill_tokens_per_s,
        decode_step_s=load.decode_step_s, kv_link_bytes_per_s=load.kv_link_bytes_per_s,
        prefix_salt=load.prefix_salt, cached_blocks=sorted(load.cached_blocks),
        state_seq=load.seq, decode_step_budget_s=load.decode_step_budget_s,
        kv_bytes_per_token=load.kv_bytes_per_token)
