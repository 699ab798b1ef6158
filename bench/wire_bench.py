"""The KV wire alone, sender and receiver as separate processes like the workers
(sender pinned to CPU 0, receiver to CPU 1 when there are two), same run:

- ``raw``: a loopback TCP socket, 1 MiB ``sendall`` → ``recv_into`` a reused buffer
  (the fastest a Python process moves bytes over a socket here);
- per KV encoding, pdserve's Prefill stream over gRPC with each side doing the
  worker's real work: the sender converts fp32 K/V into a chunk message
  (``encode_chunk_message``, CRC32C included); the receiver runs the decode
  worker's own receive path (``GrpcKVSource`` → ``receive_kv``: parse, check with
  ``KVStreamValidator`` — order, sizes, CRC32C — decode) and copies each chunk into
  an fp32 cache tensor, as ``write_kv`` does.

Wire GB/s counts payload bytes on the wire; effective GB/s counts the KV delivered
into the receiver's fp32 cache (what an unencoded stream would have carried).
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import os
import socket
import statistics
import time
from typing import Any

CHUNK_TOKENS = 2048  # one message = one layer of one prefill step (the prefill worker's
# max_num_batched_tokens)
KV_HEADS, HEAD_DIM = 3, 64
ENCODINGS = ("bf16", "int8")


def wire_throughput(repeats: int = 3, total_mb: int = 512,
                    chunk_tokens: int = CHUNK_TOKENS) -> dict[str, Any]:
    """Medians over ``repeats`` rounds, each round raw then every encoding (the machine's
    noise hits both), shares computed within each round."""
    rounds = [_round(total_mb, chunk_tokens) for _ in range(repeats)]
    out: dict[str, Any] = {"chunk_tokens": chunk_tokens, "rounds": rounds,
                           "raw_socket_GBps": statistics.median(r["raw_socket_GBps"]
                                                                for r in rounds)}
    for enc in ENCODINGS:
        out[enc] = {key: statistics.median(r[enc][key] for r in rounds) for key in rounds[0][enc]}
    return out


def _round(total_mb: int, chunk_tokens: int) -> dict[str, Any]:
    raw = _in_two_processes(_raw_sender, _raw_receiver, total_mb)["wire_GBps"]
    out: dict[str, Any] = {"raw_socket_GBps": raw}
    for enc in ENCODINGS:
        r = _in_two_processes(_kv_sender, _kv_receiver, total_mb, enc, chunk_tokens)
        r["wire_share_of_raw"] = r["wire_GBps"] / raw
        r["effective_share_of_raw"] = r["effective_GBps"] / raw
        out[enc] = r
    return out


def _in_two_processes(sender, receiver, *args: Any) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    ctx = mp.get_context("spawn")  # no forked gRPC or torch state
    ready: Any = ctx.Queue()
    results: Any = ctx.Queue()
    s = ctx.Process(target=sender, args=(ready, *args), daemon=True)
    s.start()
    r = ctx.Process(target=receiver, args=(ready.get(timeout=120), results, *args), daemon=True)
    r.start()
    try:
        return dict(results.get(timeout=600))
    finally:
        for p in (r, s):
            p.join(timeout=10)
            if p.is_alive():
                p.kill()


def _pin(cpu: int) -> None:
    from pdserve.malloc_tuning import keep_freed_memory

    if len(os.sched_getaffinity(0)) >= 2:
        os.sched_setaffinity(0, {cpu})
    keep_freed_memory()  # as the workers do


def _raw_sender(ready: Any, total_mb: int) -> None:
    _pin(0)
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    ready.put(srv.getsockname()[1])
    conn, _ = srv.accept()
    payload = b"\0" * (1 << 20)
    for _ in range(total_mb):
        conn.sendall(payload)
    conn.close()
    srv.close()


def _raw_receiver(port: int, results: Any, total_mb: int) -> None:
    _pin(1)
    s = socket.create_connection(("127.0.0.1", port))
    buf = bytearray(1 << 20)
    got, t0 = 0, time.perf_counter()
    while n := s.recv_into(buf):
        got += n
    results.put({"wire_GBps": got / (time.perf_counter() - t0) / 1e9})


def _kv_sender(ready: Any, total_mb: int, enc_name: str, chunk_tokens: int) -> None:
    _pin(0)
    asyncio.run(_serve_kv(ready, total_mb, enc_name, chunk_tokens))


async def _serve_kv(ready: Any, total_mb: int, enc_name: str, chunk_tokens: int) -> None:
    import grpc
    import torch

    from pdserve._proto.pdserve.v1 import worker_pb2_grpc
    from pdserve.convert import event_to_pb
    from pdserve.grpc_server import OPTIONS
    from pdserve.kvwire.chunk_message import encode_chunk_message
    from pdserve.kvwire.codec import Encoding
    from pdserve.kvwire.stream import FirstToken
    from pdserve.logprobs import Logprob
    from prefill_worker.servicer import add_prefill_servicer

    torch.set_num_threads(1)
    enc = Encoding.parse(enc_name)
    count = _num_chunks(total_mb, enc, chunk_tokens)
    k = torch.randn(chunk_tokens, KV_HEADS, HEAD_DIM)  # the worker's fp32 cache dtype
    header = _header(enc, chunk_tokens * count)

    class Replay(worker_pb2_grpc.PrefillWorkerServicer):
        async def Prefill(self, request, context):  # type: ignore[no-untyped-def]  # noqa: N802
            yield event_to_pb(header)
            for seq in range(count):  # all on "layer 0", token ranges in order
                yield encode_chunk_message(seq, 0, seq * chunk_tokens, k, k, enc)[0]
            yield event_to_pb(FirstToken(Logprob(0, 0.0, []), 0.0, header.num_tokens))

    server = grpc.aio.server(options=OPTIONS)
    add_prefill_servicer(Replay(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    ready.put(port)
    await server.wait_for_termination(timeout=600)


def _num_chunks(total_mb: int, enc: Any, chunk_tokens: int) -> int:
    from pdserve.kvwire.codec import bytes_per_token

    return max(1, (total_mb << 20) // (bytes_per_token(enc, 1, KV_HEADS, HEAD_DIM) * chunk_tokens))


def _header(enc: Any, num_tokens: int) -> Any:
    from pdserve.kvwire.stream import PROTOCOL_VERSION, KVHeader

    return KVHeader(PROTOCOL_VERSION, "wire-check", 1, KV_HEADS, HEAD_DIM, 16, enc, num_tokens)


def _kv_receiver(port: int, results: Any, total_mb: int, enc_name: str,
                 chunk_tokens: int) -> None:
    _pin(1)
    results.put(asyncio.run(_receive_kv(port, total_mb, enc_name, chunk_tokens)))


async def _receive_kv(port: int, total_mb: int, enc_name: str,
                      chunk_tokens: int) -> dict[str, float]:
    """The decode worker's receive path (its gRPC KV source, the stream validator, the
    decode), writing into a plain fp32 tensor where ``write_kv`` writes into blocks."""
    import torch

    from decode_worker.kv_source import GrpcKVSource
    from pdserve.kvwire.codec import Encoding
    from pdserve.kvwire.receiver import receive_kv
    from pdserve.kvwire.stream import KVRequest, KVStreamValidator
    from pdserve.sampling_params import SamplingParams

    torch.set_num_threads(1)
    enc = Encoding.parse(enc_name)
    val = KVStreamValidator(_header(enc, chunk_tokens * _num_chunks(total_mb, enc, chunk_tokens)))
    cache = torch.empty(2, chunk_tokens, KV_HEADS, HEAD_DIM)  # (k|v, tokens, kvh, hd)
    delivered = 0

    def write(layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        nonlocal delivered
        cache[0].copy_(k)
        cache[1].copy_(v)
        delivered += cache.numel() * 4

    source = GrpcKVSource()
    request = KVRequest("wire-check", [], SamplingParams(), enc)
    try:
        t0 = time.perf_counter()
        _, stats = await receive_kv(source.prefill(f"127.0.0.1:{port}", request, 600.0),
                                    val, write)
        elapsed = time.perf_counter() - t0
    finally:
        await source.close()
    return {"wire_GBps": stats.bytes / elapsed / 1e9, "effective_GBps": delivered / elapsed / 1e9}
