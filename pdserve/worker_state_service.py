"""``WorkerState.GetState`` on every worker: the one place its reply meets protobuf
(the router's side is router/decode_client.py). Answers from the serving thread
without waiting for the engine's step (pdserve/worker_state.py)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import grpc

from pdserve._proto.pdserve.v1 import worker_pb2, worker_pb2_grpc
from pdserve.engine.async_engine import AsyncEngine
from pdserve.kvwire.codec import Encoding, bytes_per_token, resolve
from pdserve.worker_state import LinkState, WorkerLoad, load_of

SERVICE_NAME = "pdserve.v1.WorkerState"


class WorkerStateServicer(worker_pb2_grpc.WorkerStateServicer):
    def __init__(self, role: str) -> None:
        self.role = role
        self.engine: AsyncEngine | None = None
        self.link: Callable[[], tuple[float, int]] = lambda: (0.0, 0)
        self.wire = LinkState()

    def attach(self, engine: AsyncEngine, link: Callable[[], tuple[float, int]],
               kv_encoding: str) -> None:
        """Serve ``engine``'s state; ``link``: the KV link's measured bytes/s and the
        bytes still to arrive; ``kv_encoding``: this worker's default on the wire."""
        self.engine, self.link = engine, link
        s = engine.engine.spec
        by_encoding = {int(e): float(bytes_per_token(e, s.num_layers, s.num_kv_heads,
                                                     s.head_dim))
                       for e in Encoding if e is not Encoding.MODEL}
        default = resolve(Encoding.parse(kv_encoding), engine.engine.weight_dtype)
        self.wire = LinkState(bytes_per_token=by_encoding[int(default)],
                              bytes_per_token_by_encoding=by_encoding)

    async def GetState(self, request: worker_pb2.WorkerStateRequest,  # noqa: N802 - gRPC name
                       context: grpc.aio.ServicerContext) -> worker_pb2.WorkerStateReply:
        if self.engine is None or self.engine.dead is not None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"{self.role} worker: no engine")
        rate, pending = self.link()
        link = replace(self.wire, bytes_per_s=rate, pending_bytes=pending)
        load = load_of(self.engine.engine, self.role, link,  # type: ignore[union-attr]
                       request.prefix_summary)
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
        kv_bytes_per_token=load.kv_bytes_per_token,
        kv_bytes_per_token_by_encoding=load.kv_bytes_per_token_by_encoding,
        kv_pending_bytes=load.kv_pending_bytes)
