"""A hostile prefill worker, as a real process: it speaks ``PrefillWorker.Prefill``
(proto/pdserve/v1/worker.proto), relays each request to the real prefill worker at
``--upstream``, and sends the decode worker that stream malformed as the request id
asks (``...~h=MODE``; bench/chaos/hostile_modes.py lists the modes); a request id
without a mode is relayed honestly. It serves ``grpc.health.v1`` SERVING, so a
router that probes prefill workers keeps it in the pool.

Per call: RECEIVED → UPSTREAM (the honest stream collected from the real prefill
worker; its failure is relayed as its own status, logged as mode
``upstream_failed``) → SENDING (the mode's script; logged to ``--log``: request id,
mode) → ENDED (OK, a status, or a stall that lasts until the caller cancels).

    python -m bench.chaos.hostile_prefill --upstream 127.0.0.1:PORT --vocab-size 320 \
        --log /tmp/hostile.jsonl [--port 0]

prints its port on stdout once it serves.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections.abc import AsyncIterator

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from bench.chaos.hostile_modes import HUGE_BYTES, MODES, Honest, Script, mode_of
from pdserve._proto.pdserve.v1 import worker_pb2, worker_pb2_grpc

OPTIONS = [("grpc.max_send_message_length", 2 * HUGE_BYTES),
           ("grpc.max_receive_message_length", 2 * HUGE_BYTES)]


class HostilePrefill:
    def __init__(self, upstream: str, vocab_size: int, log_path: str) -> None:
        self.channel = grpc.aio.insecure_channel(upstream, options=OPTIONS)
        self.stub = worker_pb2_grpc.PrefillWorkerStub(self.channel)
        self.vocab_size = vocab_size
        self.log_path = log_path

    async def prefill(self, request: worker_pb2.PrefillRequest,
                      context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        mode = mode_of(request.request_id)
        if mode not in MODES:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"unknown mode {mode!r}")
        honest = await self._upstream(request, context)
        self._log(request.request_id, mode)
        script = MODES[mode][1](honest)
        async for data in self._send(script, context):
            yield data

    async def _upstream(self, request: worker_pb2.PrefillRequest,
                        context: grpc.aio.ServicerContext) -> Honest:
        try:
            messages = [m async for m in self.stub.Prefill(request, timeout=120)]
        except grpc.aio.AioRpcError as e:  # the real worker failed: say so, as it would
            self._log(request.request_id, "upstream_failed")
            await context.abort(e.code(), f"upstream prefill worker: {e.details()}")
        return Honest.of(messages, self.vocab_size)

    async def _send(self, script: Script,
                    context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        for pause_s, data in script.sends:
            if pause_s:
                await asyncio.sleep(pause_s)
            yield data
        if script.end == "stall":
            await asyncio.Event().wait()  # until the caller cancels
        elif script.end != "ok":
            await context.abort(getattr(grpc.StatusCode, script.end), script.details)

    def _log(self, request_id: str, mode: str) -> None:
        with open(self.log_path, "a") as f:
            f.write(json.dumps({"t": time.time(), "request_id": request_id,
                                "mode": mode}) + "\n")


def _identity(b: bytes) -> bytes:
    return b


async def serve(upstream: str, vocab_size: int, log_path: str, host: str, port: int) -> None:
    server = grpc.aio.server(options=OPTIONS)
    peer = HostilePrefill(upstream, vocab_size, log_path)
    handler = grpc.unary_stream_rpc_method_handler(
        peer.prefill, request_deserializer=worker_pb2.PrefillRequest.FromString,
        response_serializer=_identity)
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(
        "pdserve.v1.PrefillWorker", {"Prefill": handler})])
    checker = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(checker, server)
    for name in ("", "pdserve.v1.PrefillWorker"):
        await checker.set(name, health_pb2.HealthCheckResponse.SERVING)
    bound = server.add_insecure_port(f"{host}:{port}")
    await server.start()
    print(bound, flush=True)
    await server.wait_for_termination()


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.chaos.hostile_prefill")
    p.add_argument("--upstream", required=True, help="host:port of a real prefill worker")
    p.add_argument("--vocab-size", type=int, required=True)
    p.add_argument("--log", required=True, help="JSON lines: one per request received")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    a = p.parse_args()
    asyncio.run(serve(a.upstream, a.vocab_size, a.log, a.host, a.port))


if __name__ == "__main__":
    main()
