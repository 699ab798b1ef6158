"""A prefill worker that dies mid-transfer, as a real process: it relays the real
prefill worker at ``--upstream`` and, after ``--chunks`` KV chunks, kills itself
(SIGKILL, no goodbye on the socket). Used by the chaos tests.

    python -m tests.dying_prefill --upstream 127.0.0.1:PORT --chunks 3
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal

import grpc

from pdserve._proto.pdserve.v1 import worker_pb2_grpc


class DyingPrefill(worker_pb2_grpc.PrefillWorkerServicer):
    def __init__(self, upstream: str, chunks: int) -> None:
        self.upstream, self.chunks = upstream, chunks

    async def Prefill(self, request, context):  # type: ignore[no-untyped-def]  # noqa: N802
        async with grpc.aio.insecure_channel(self.upstream) as ch:
            sent = 0
            async for msg in worker_pb2_grpc.PrefillWorkerStub(ch).Prefill(request):
                if msg.WhichOneof("kind") == "chunk":
                    if sent == self.chunks:
                        os.kill(os.getpid(), signal.SIGKILL)
                    sent += 1
                yield msg


async def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--upstream", required=True)
    p.add_argument("--chunks", type=int, default=3)
    a = p.parse_args()
    server = grpc.aio.server()
    worker_pb2_grpc.add_PrefillWorkerServicer_to_server(DyingPrefill(a.upstream, a.chunks), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(port, flush=True)
    await server.wait_for_termination()


if __name__ == "__main__":
    asyncio.run(main())
