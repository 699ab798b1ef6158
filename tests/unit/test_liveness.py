"""Every role's server answers "liveness" SERVING from start until it stops, while
"" follows whether it can serve (what the Kubernetes liveness and readiness probes ask)."""

from __future__ import annotations

import asyncio

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pdserve.grpc_server import LIVENESS_SERVICE, Server

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def test_liveness_stays_serving_while_readiness_flips() -> None:
    async def scenario() -> None:
        server = Server("127.0.0.1", 0, ["pdserve.v1.Generation"])
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as ch:
                stub = health_pb2_grpc.HealthStub(ch)

                async def status(name: str) -> int:
                    r = await stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=5)
                    return int(r.status)

                await server.set_serving(False)
                assert await status("") == NOT_SERVING
                assert await status(LIVENESS_SERVICE) == SERVING
                await server.set_serving(True)
                assert await status("") == SERVING
                assert await status(LIVENESS_SERVICE) == SERVING
        finally:
            await server.stop(0)

    asyncio.run(scenario())
