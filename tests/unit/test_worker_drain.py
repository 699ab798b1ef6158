"""A worker told to stop drains: health NOT_SERVING at once, in-flight requests
finish, then the server stops (tiny model, real gRPC on localhost)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from decode_worker.servicer import DecodeServicer
from pdserve._proto.pdserve.v1 import common_pb2, worker_pb2, worker_pb2_grpc
from pdserve.config import EngineConfig, WorkerConfig
from pdserve.worker_host import RunningWorker, start_worker


def test_stop_drains_in_flight_requests(tiny_llama: Path) -> None:
    engine = EngineConfig(model=str(tiny_llama), dtype="float32", num_kv_blocks=64)

    async def scenario() -> None:
        d = await start_worker(WorkerConfig(role="decode", engine=engine, port=0), DecodeServicer)
        params = common_pb2.SamplingParams(max_tokens=300, temperature=0, ignore_eos=True)
        req = worker_pb2.DecodeRequest(request_id="r", prompt_token_ids=list(range(5, 25)),
                                       params=params)
        try:
            await asyncio.wait_for(_drain_while_streaming(d, req), 30)
        except BaseException:
            await d.stop(0)  # else the engine thread outlives the test
            raise
        assert d.engine.engine.blocks.all_free()

    asyncio.run(scenario())


async def _drain_while_streaming(d: RunningWorker, req: worker_pb2.DecodeRequest) -> None:
    async with grpc.aio.insecure_channel(d.address) as ch:
        health = health_pb2_grpc.HealthStub(ch)
        stream = worker_pb2_grpc.DecodeWorkerStub(ch).Generate(req, timeout=30)
        tokens = len((await stream.read()).token_ids)
        stopping = asyncio.create_task(d.stop(grace=20))
        await asyncio.sleep(0.01)
        r = await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
        assert r.status == health_pb2.HealthCheckResponse.NOT_SERVING
        assert not stopping.done()
        while (msg := await stream.read()) is not grpc.aio.EOF:
            tokens += len(msg.token_ids)
        assert tokens == 300
    await asyncio.wait_for(stopping, 5)
