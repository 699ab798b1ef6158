"""Pulls one request's KV from a prefill worker into blocks reserved for it.

RESERVED (blocks held) → HEADER_OK → RECEIVING (chunks checked, then written)
→ COMMITTED (first token known; the request joins the decode batch).
Any failure before COMMITTED aborts the import, which frees the blocks.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import grpc

from pdserve._proto.pdserve.v1 import worker_pb2, worker_pb2_grpc
from pdserve.convert import chunk_from_pb, header_from_pb
from pdserve.engine.async_engine import AsyncEngine
from pdserve.engine.sampling_params import SamplingParams
from pdserve.grpc_server import OPTIONS
from pdserve.kvwire.codec import Encoding, decode
from pdserve.kvwire.stream import PROTOCOL_VERSION, KVHeader, KVStreamError, KVStreamValidator
from pdserve.params_pb import logprob_from_pb, params_to_pb


@dataclass
class TransferStats:
    prefill_compute_s: float = 0.0
    transfer_s: float = 0.0
    bytes: int = 0


class PrefillClients:
    """One channel per prefill worker address, reused across requests."""

    def __init__(self) -> None:
        self._stubs: dict[str, worker_pb2_grpc.PrefillWorkerStub] = {}
        self._channels: list[grpc.aio.Channel] = []

    def stub(self, address: str) -> worker_pb2_grpc.PrefillWorkerStub:
        if address not in self._stubs:
            channel = grpc.aio.insecure_channel(address, options=OPTIONS)
            self._channels.append(channel)
            self._stubs[address] = worker_pb2_grpc.PrefillWorkerStub(channel)
        return self._stubs[address]

    async def close(self) -> None:
        for c in self._channels:
            await c.close()


async def receive_kv(engine: AsyncEngine, clients: PrefillClients, address: str, rid: str,
                     prompt: list[int], params: SamplingParams, enc: Encoding,
                     timeout: float) -> TransferStats:
    """Prefill ``prompt`` on ``address`` into the request's reserved blocks and commit."""
    e = engine.engine
    s = e.spec
    expected = KVHeader(PROTOCOL_VERSION, s.name, s.num_layers, s.num_kv_heads, s.head_dim,
                        e.blocks.block_size, enc, len(prompt))
    val = KVStreamValidator(expected)
    stats = TransferStats()
    call = clients.stub(address).Prefill(
        worker_pb2.PrefillRequest(request_id=rid, prompt_token_ids=prompt,
                                  params=params_to_pb(params),
                                  encoding=int(enc)),  # type: ignore[arg-type]
        timeout=timeout)
    t0: float | None = None
    try:
        async for msg in call:
            kind = msg.WhichOneof("kind")
            if kind == "header":
                val.check_header(header_from_pb(msg.header))
            elif kind == "chunk":
                t0 = t0 or time.perf_counter()
                chunk = chunk_from_pb(msg.chunk)
                val.check_chunk(chunk)
                k, v = decode(chunk.payload, chunk.encoding, chunk.num_tokens,
                              s.num_kv_heads, s.head_dim)
                engine.send(_writer(e, rid, chunk.layer, chunk.token_offset, k, v))
            elif kind == "first_token":
                val.check_complete()
                stats.transfer_s = time.perf_counter() - t0 if t0 else 0.0
                stats.prefill_compute_s = msg.first_token.prefill_compute_s
                stats.bytes = val.bytes_received
                lp = logprob_from_pb(msg.first_token.token)
                await engine.call(e.commit_import, rid, lp.token_id,
                                  lp if params.logprobs is not None else None)
                return stats
        raise KVStreamError("DATA_LOSS", "prefill stream ended without a first token")
    finally:
        call.cancel()


def _writer(engine, rid, layer, start, k, v):  # type: ignore[no-untyped-def]
    return lambda: engine.write_kv(rid, layer, start, k, v)
