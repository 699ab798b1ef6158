"""W5, the KV hand-off: does the transfer hide behind prefill compute?

Starts a disaggregated cluster (prefill on CPU 0, decode on CPU 1, one thread
each), sends one request at a time of 256, 1024 and 2048 random prompt tokens
with 1 output token, per KV encoding, and reports TTFT, the prefill compute time
measured inside the prefill worker, the exposed rest (TTFT − compute) and the
bytes on the wire. In the same run it measures the wire alone: a raw loopback
TCP socket, and pdserve's KV stream (the real codec and gRPC messages) replayed
from memory without compute.
"""

from __future__ import annotations

import asyncio
import socket
import statistics
import threading
import time
from typing import Any

import grpc
import torch

from bench.workloads import random_prompts
from pdserve._proto.pdserve.v1 import worker_pb2, worker_pb2_grpc
from pdserve.client import Client
from pdserve.cluster import ClusterConfig, Member, start, stop
from pdserve.convert import chunk_from_pb, chunk_response_bytes
from pdserve.grpc_server import OPTIONS
from pdserve.kvwire.codec import Encoding, bytes_per_token, decode, encode
from pdserve.kvwire.stream import KVChunk
from prefill_worker.servicer import add_prefill_servicer

SIZES = (256, 1024, 2048)
ENCODINGS = {"model": 0, "bf16": 2, "fp16": 3, "int8": 4}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_w5(model: str | None, dtype: str, repeats: int, vocab: int) -> dict[str, Any]:
    two = len(__import__("os").sched_getaffinity(0)) >= 2
    c = ClusterConfig(model=model, dtype=dtype, router_port=_free_port(), http_port=0,
                      local_prefill_below=1,
                      prefill=[Member(_free_port(), 0, (0,) if two else None, 1)],
                      decode=[Member(_free_port(), 0, (1,) if two else None, 1)])
    procs = start(c)
    try:
        client = Client(f"127.0.0.1:{c.router_port}", timeout=600)
        list(client.generate([1, 2, 3, 4], max_tokens=2))  # warm-up
        rows = [_measure(client, n, enc, repeats, vocab)
                for enc in ENCODINGS for n in SIZES]
        client.close()
    finally:
        stop(procs)
    return {"requests": rows, "wire": wire_throughput()}


def _measure(client: Client, n: int, enc: str, repeats: int, vocab: int) -> dict[str, Any]:
    prompt = random_prompts(1, n, vocab, seed=5)[0]
    samples = []
    for _ in range(repeats):
        last = None
        for d in client.generate(prompt, max_tokens=1, ignore_eos=True,
                                 kv_encoding=ENCODINGS[enc]):
            last = d
        assert last is not None and last.timings["plan"] == "remote"
        samples.append(last.timings)
    ttft = statistics.median(t["ttft_s"] for t in samples)
    compute = statistics.median(t["prefill_compute_s"] for t in samples)
    kv_bytes = samples[0]["kv_bytes"]
    return {"prompt_tokens": n, "encoding": enc, "ttft_s": ttft, "prefill_compute_s": compute,
            "exposed_s": ttft - compute, "exposed_share": (ttft - compute) / ttft,
            "kv_bytes": kv_bytes, "bytes_per_token": kv_bytes / n}


def wire_throughput(total_mb: int = 256) -> dict[str, Any]:
    """The wire alone, same run: a raw loopback socket, and pdserve's KV stream per
    encoding with the receiver doing its real work (parse, CRC32C, decode to the
    cache dtype). Wire GB/s counts bytes on the wire; effective GB/s counts the KV
    delivered into the receiver's fp32 cache (what an uncompressed stream would
    have had to carry)."""
    raw = _raw_socket_gbps(total_mb)
    out: dict[str, Any] = {"raw_socket_GBps": raw}
    for enc in (Encoding.BF16, Encoding.INT8):
        wire, effective = asyncio.run(_kv_stream_gbps(total_mb, enc))
        name = enc.name.lower()
        out[name] = {"wire_GBps": wire, "effective_GBps": effective,
                     "wire_share_of_raw": wire / raw, "effective_share_of_raw": effective / raw}
    return out


def _raw_socket_gbps(total_mb: int) -> float:
    payload = b"\0" * (1 << 20)
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    got = [0]

    def sink() -> None:
        conn, _ = srv.accept()
        while data := conn.recv(1 << 20):
            got[0] += len(data)
        conn.close()

    t = threading.Thread(target=sink)
    t.start()
    s = socket.create_connection(srv.getsockname())
    t0 = time.perf_counter()
    for _ in range(total_mb):
        s.sendall(payload)
    s.close()
    t.join()
    srv.close()
    return got[0] / (time.perf_counter() - t0) / 1e9


class _Replay(worker_pb2_grpc.PrefillWorkerServicer):
    """Streams KV chunks without compute: each message is one layer of one 2,048-token
    prefill step, encoded and serialized per message the way the prefill worker does."""

    def __init__(self, count: int, encoding: Encoding) -> None:
        self.k = torch.randn(2048, 3, 64)
        self.count, self.encoding = count, encoding

    async def Prefill(self, request, context):  # type: ignore[no-untyped-def]  # noqa: N802
        for seq in range(self.count):
            payload = encode(self.k, self.k, self.encoding)
            yield chunk_response_bytes(
                KVChunk(seq, 0, 0, 2048, self.encoding, payload, payload.crc32c()))


async def _kv_stream_gbps(total_mb: int, encoding: Encoding) -> tuple[float, float]:
    per_msg = bytes_per_token(encoding, 1, 3, 64) * 2048  # k and v of one layer
    replay = _Replay(max(1, total_mb * (1 << 20) // per_msg), encoding)
    server = grpc.aio.server(options=OPTIONS)
    add_prefill_servicer(replay, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=OPTIONS) as ch:
        stub = worker_pb2_grpc.PrefillWorkerStub(ch)
        t0 = time.perf_counter()
        wire = delivered = 0
        async for msg in stub.Prefill(worker_pb2.PrefillRequest()):
            chunk = chunk_from_pb(msg.chunk)
            if chunk.payload.crc32c() != chunk.crc32c:
                raise RuntimeError("CRC mismatch in the wire check")
            k, v = decode(chunk.payload, chunk.encoding, chunk.num_tokens, 3, 64)
            wire += chunk.payload.nbytes
            delivered += (k.numel() + v.numel()) * 4  # into an fp32 cache
        elapsed = time.perf_counter() - t0
    await server.stop(0)
    return wire / elapsed / 1e9, delivered / elapsed / 1e9
