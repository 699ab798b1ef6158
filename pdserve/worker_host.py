"""The process around a prefill or decode worker: pin, load, serve, drain on SIGTERM.

The host knows no role: each role's ``__main__`` hands it a servicer factory
(``python -m decode_worker`` calls ``main("decode", DecodeServicer)``), and the
host wires what every worker shares around it: gRPC server with health and
reflection (mTLS with ``--tls-*``, a plaintext ``--health-port`` for probes),
engine, metrics, pinning, structured logs, the drain.

Pinning is pdserve/placement.py's: explicit ``--cpus``, else next to the GPU, else
worker ``--slot`` of ``--slots`` spread over this machine's NUMA nodes and CPUs.

STARTING (health NOT_SERVING while the model loads) → SERVING → DRAINING (SIGTERM
or SIGINT: health NOT_SERVING, in-flight calls get a grace period) → STOPPED.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Protocol

import grpc

from pdserve import logs, placement
from pdserve.config import WorkerConfig
from pdserve.engine.async_engine import AsyncEngine
from pdserve.engine.engine import LLMEngine
from pdserve.grpc_server import Server, exit_with_parent, until_stop_signal
from pdserve.malloc_tuning import keep_freed_memory
from pdserve.metrics import WorkerMetrics
from pdserve.worker_args import parse_invocation

log = logging.getLogger("pdserve.worker")


class WorkerServicer(Protocol):
    """What a role's servicer offers its host (decode_worker/, prefill_worker/)."""

    @property
    def service_name(self) -> str: ...

    def register(self, server: grpc.aio.Server) -> None: ...

    def attach(self, engine: AsyncEngine, metrics: WorkerMetrics) -> None: ...


ServicerFactory = Callable[[WorkerConfig], WorkerServicer]


def pin(config: WorkerConfig) -> WorkerConfig:
    """Pin this process before torch starts its threads; the engine gets the thread count."""
    decision = placement.pin(config.placement)
    if decision.threads is None or config.engine.num_threads is not None:
        return config
    return replace(config, engine=replace(config.engine, num_threads=decision.threads))


@dataclass
class RunningWorker:
    server: Server
    engine: AsyncEngine
    metrics: WorkerMetrics

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.server.port}"

    async def stop(self, grace: float = 10.0) -> None:
        """DRAINING: health NOT_SERVING (probes still answered), in-flight requests get
        up to ``grace`` seconds to finish, then the server stops."""
        await self.server.set_serving(False)
        deadline = time.monotonic() + grace
        while self.engine.engine.requests and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        await self.server.stop(max(0.0, deadline - time.monotonic()))
        self.engine.stop()


async def start_worker(config: WorkerConfig, servicer_factory: ServicerFactory) -> RunningWorker:
    """STARTING: bind, load the model (health NOT_SERVING meanwhile); then SERVING."""
    keep_freed_memory()  # before the KV stream's buffers come and go
    servicer = servicer_factory(config)
    server = Server(config.host, config.port, [servicer.service_name], tls=config.tls,
                    health_port=config.health_port)
    servicer.register(server.server)  # gRPC needs its services before start
    await server.start()
    await server.set_serving(False)
    engine = AsyncEngine(await asyncio.to_thread(LLMEngine, config.engine))
    engine.start()
    logs.set_model(engine.engine.spec.name)
    metrics = _serve_metrics(config, engine)
    servicer.attach(engine, metrics)
    await server.set_serving(True)
    return RunningWorker(server, engine, metrics)


def _serve_metrics(config: WorkerConfig, engine: AsyncEngine) -> WorkerMetrics:
    metrics = WorkerMetrics(engine.engine.spec.name, config.role)
    e = engine.engine
    metrics.watch(lambda: len(e.scheduler.running), lambda: len(e.scheduler.waiting),
                  lambda: e.blocks.usage)
    metrics.serve(config.host, config.metrics_port)
    return metrics


async def serve(config: WorkerConfig, servicer_factory: ServicerFactory) -> None:
    worker = await start_worker(config, servicer_factory)
    print(f"{config.role} worker serving on {config.host}:{worker.server.port}", flush=True)
    await until_stop_signal()
    log.info("draining")
    await worker.stop()


def main(role: str, servicer_factory: ServicerFactory, argv: list[str] | None = None) -> int:
    """``python -m {role}_worker``: parse, log, pin, serve until SIGTERM; 2 on a bad config."""
    exit_with_parent()
    try:
        config, log_format = parse_invocation(role, argv)
        logs.configure(role, fmt=log_format)
        asyncio.run(serve(pin(config), servicer_factory))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
