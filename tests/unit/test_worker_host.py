"""The worker host around a servicer it knows only by the WorkerServicer protocol:
STARTING (registered, NOT_SERVING) → SERVING (engine attached) → DRAINING → STOPPED
(tiny model, real gRPC on localhost, a fake servicer instead of a role's)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pdserve.config import EngineConfig, WorkerConfig
from pdserve.engine.async_engine import AsyncEngine
from pdserve.metrics import WorkerMetrics
from pdserve.worker_host import RunningWorker, WorkerServicer, start_worker


class FakeServicer:
    """Records what the host hands it; serves no RPC of its own."""

    service_name = "pdserve.test.Fake"

    def __init__(self, config: WorkerConfig) -> None:
        self.config = config
        self.registered: grpc.aio.Server | None = None
        self.attached: tuple[AsyncEngine, WorkerMetrics] | None = None

    def register(self, server: grpc.aio.Server) -> None:
        assert self.attached is None  # services go in before the server starts
        self.registered = server

    def attach(self, engine: AsyncEngine, metrics: WorkerMetrics) -> None:
        self.attached = (engine, metrics)

    def kv_link(self) -> tuple[float, int]:
        return 0.0, 0  # receives no KV


async def _health(w: RunningWorker, service: str) -> int:
    async with grpc.aio.insecure_channel(w.address) as ch:
        r = await health_pb2_grpc.HealthStub(ch).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=5)
        return int(r.status)


def test_host_wires_any_servicer_then_drains(tiny_llama: Path) -> None:
    made: list[FakeServicer] = []

    def factory(config: WorkerConfig) -> WorkerServicer:
        made.append(FakeServicer(config))
        return made[-1]

    config = WorkerConfig(role="prefill", port=0, engine=EngineConfig(
        model=str(tiny_llama), dtype="float32", num_kv_blocks=16))

    async def scenario() -> None:
        w = await start_worker(config, factory)
        try:
            (s,) = made
            assert s.config == config and s.registered is w.server.server
            assert s.attached == (w.engine, w.metrics)
            serving = health_pb2.HealthCheckResponse.SERVING
            assert await _health(w, "") == await _health(w, FakeServicer.service_name) == serving
        finally:
            await w.stop(grace=1)
        assert w.engine.engine.blocks.all_free() and not w.engine.engine.requests

    asyncio.run(scenario())
