"""Pulls one request's KV from a prefill worker into blocks reserved for it.

RESERVED (blocks held) → HEADER_OK → RECEIVING (chunks checked, then written)
→ COMMITTED (first token known; the request joins the decode batch).
Any failure before COMMITTED aborts the import, which frees the blocks.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import grpc

from pdserve._proto.pdserve.v1 import worker_pb2
from pdserve.convert import header_from_pb, parse_prefill_response
from pdserve.engine.async_engine import AsyncEngine
from pdserve.grpc_server import OPTIONS
from pdserve.kvwire.codec import Encoding, decode
from pdserve.kvwire.stream import (
    PROTOCOL_VERSION,
    KVChunk,
    KVHeader,
    KVStreamError,
    KVStreamValidator,
)
from pdserve.params_pb import logprob_from_pb, params_to_pb
from pdserve.sampling_params import SamplingParams

PREFILL_METHOD = "/pdserve.v1.PrefillWorker/Prefill"


@dataclass
class TransferStats:
    prefill_compute_s: float = 0.0
    transfer_s: float = 0.0
    bytes: int = 0


class PrefillClients:
    """One channel per prefill worker address, reused across requests. The Prefill
    stream's responses come up as bytes: ``parse_prefill_response`` reads the KV
    chunks in them without copying (the generated stub would parse each through
    protobuf objects)."""

    def __init__(self) -> None:
        self._calls: dict[str, grpc.aio.UnaryStreamMultiCallable] = {}
        self._channels: list[grpc.aio.Channel] = []

    def prefill(self, address: str) -> grpc.aio.UnaryStreamMultiCallable:
        if address not in self._calls:
            channel = grpc.aio.insecure_channel(address, options=OPTIONS)
            self._channels.append(channel)
            self._calls[address] = channel.unary_stream(
                PREFILL_METHOD, request_serializer=worker_pb2.PrefillRequest.SerializeToString)
        return self._calls[address]

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
    call = clients.prefill(address)(
        worker_pb2.PrefillRequest(request_id=rid, prompt_token_ids=prompt,
                                  params=params_to_pb(params),
                                  encoding=int(enc)),  # type: ignore[arg-type]
        timeout=timeout)
    t0: float | None = None
    try:
        async for data in call:
            msg = parse_prefill_response(data)
            if isinstance(msg, KVChunk):
                t0 = t0 or time.perf_counter()
                chunk = msg
                val.check_chunk(chunk)
                k, v = decode(chunk.payload, chunk.encoding, chunk.num_tokens,
                              s.num_kv_heads, s.head_dim)
                engine.send(_writer(e, rid, chunk.layer, chunk.token_offset, k, v))
                continue
            kind = msg.WhichOneof("kind")
            if kind == "header":
                val.check_header(header_from_pb(msg.header))
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
