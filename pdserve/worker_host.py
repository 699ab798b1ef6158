"""The process around a prefill or decode worker: pin, load, serve, drain on SIGTERM.

The host knows no role: each role's ``__main__`` hands it a servicer factory
(``python -m decode_worker`` calls ``main("decode", DecodeServicer)``), and the
host wires what every worker shares around it: gRPC server with health and
reflection (mTLS with ``--tls-*``, a plaintext ``--health-port`` for probes),
engine, metrics, pinning, structured logs, the drain.

Pinning is pdserve/placement.py's: explicit ``--cpus``, else next to the GPU, else
worker ``--slot`` of ``--slots`` spread over this machine's NUMA nodes and CPUs.

STARTING (health NOT_SERVING while the model loads) → SERVING → DRAINING (SIGTERM
or SIGINT: health NOT_SERVING, in-flight calls get a grace period) → STOPPED (exit 0).

SERVING → DYING when the engine thread dies (an exception escaped a step; see
pdserve/engine/async_engine.py): health NOT_SERVING on every service name at once,
then every open call ends with UNAVAILABLE "engine died: …"
(pdserve/engine_death_status.py), the server gets ``DEATH_GRACE_S`` for those
statuses to reach their callers → EXITED with ``EXIT_ENGINE_DIED`` (70, EX_SOFTWARE),
so whatever runs the process (the process launcher's supervisor, Ray, Kubernetes)
starts a fresh one. A dead engine is never revived in place: its blocks and batch
can no longer be trusted.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Protocol

import grpc

from pdserve import logs, placement
from pdserve._proto.pdserve.v1 import worker_pb2_grpc
from pdserve.config import EngineConfig, WorkerConfig
from pdserve.engine.async_engine import AsyncEngine
from pdserve.engine.engine import LLMEngine
from pdserve.engine_death_status import EngineDeathStatus
from pdserve.grpc_server import Server, exit_with_parent, until_stop_signal
from pdserve.malloc_tuning import keep_freed_memory
from pdserve.metrics import WorkerMetrics
from pdserve.worker_args import parse_invocation
from pdserve.worker_state_service import SERVICE_NAME as STATE_SERVICE
from pdserve.worker_state_service import WorkerStateServicer

log = logging.getLogger("pdserve.worker")


class WorkerServicer(Protocol):
    """What a role's servicer offers its host (decode_worker/, prefill_worker/)."""

    @property
    def service_name(self) -> str: ...

    def register(self, server: grpc.aio.Server) -> None: ...

    def attach(self, engine: AsyncEngine, metrics: WorkerMetrics) -> None: ...

    def kv_link(self) -> tuple[float, int]:
        """KV bytes received per second of transfer, measured (0: none received), and
        the bytes of KV imports still to arrive."""


ServicerFactory = Callable[[WorkerConfig], WorkerServicer]
EngineFactory = Callable[[EngineConfig], LLMEngine]  # tests hand in a faulting one

EXIT_ENGINE_DIED = 70  # EX_SOFTWARE: restart me
DEATH_GRACE_S = 2.0  # for the callers' UNAVAILABLE statuses to leave the process
HARD_EXIT_AFTER_S = 15.0  # a dying process that hangs in teardown is ended anyway


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

    async def die(self) -> int:
        """DYING (health is NOT_SERVING and the callers were failed already by then):
        give their statuses ``DEATH_GRACE_S`` to go out, then the exit code."""
        error = await self.engine.wait_dead()
        _exit_regardless_after(HARD_EXIT_AFTER_S, EXIT_ENGINE_DIED)
        log.warning("engine died, exiting %d so the worker is restarted: %s: %s",
                    EXIT_ENGINE_DIED, type(error).__name__, error)
        await self.server.stop(DEATH_GRACE_S)
        self.engine.stop()
        return EXIT_ENGINE_DIED


def _exit_regardless_after(seconds: float, code: int) -> None:
    """A watchdog: if the orderly exit has not happened in ``seconds``, end now."""
    timer = threading.Timer(seconds, os._exit, (code,))
    timer.daemon = True
    timer.start()


async def start_worker(config: WorkerConfig, servicer_factory: ServicerFactory,
                       engine_factory: EngineFactory = LLMEngine) -> RunningWorker:
    """STARTING: bind, load the model (health NOT_SERVING meanwhile); then SERVING."""
    keep_freed_memory()  # before the KV stream's buffers come and go
    servicer = servicer_factory(config)
    state = WorkerStateServicer(config.role)
    names = [servicer.service_name, STATE_SERVICE]
    server = Server(config.host, config.port, names, [EngineDeathStatus(names)], tls=config.tls,
                    health_port=config.health_port)
    servicer.register(server.server)  # gRPC needs its services before start
    worker_pb2_grpc.add_WorkerStateServicer_to_server(state, server.server)
    await server.start()
    await server.set_serving(False)

    async def not_serving(_: BaseException) -> None:  # before any caller hears of it
        await server.set_serving(False)

    engine = AsyncEngine(await asyncio.to_thread(engine_factory, config.engine), not_serving)
    engine.start()
    logs.set_model(engine.engine.spec.name)
    metrics = _serve_metrics(config, engine)
    servicer.attach(engine, metrics)
    state.attach(engine, servicer.kv_link, config.kv_encoding)
    await server.set_serving(True)
    return RunningWorker(server, engine, metrics)


def _serve_metrics(config: WorkerConfig, engine: AsyncEngine) -> WorkerMetrics:
    metrics = WorkerMetrics(engine.engine.spec.name, config.role)
    e = engine.engine
    metrics.watch(lambda: len(e.scheduler.running), lambda: len(e.scheduler.waiting),
                  lambda: e.blocks.usage, e.scheduler.counters)
    metrics.serve(config.host, config.metrics_port)
    return metrics


async def serve(config: WorkerConfig, servicer_factory: ServicerFactory,
                engine_factory: EngineFactory = LLMEngine) -> int:
    """SERVING until SIGTERM (drain, 0) or the engine's death (``EXIT_ENGINE_DIED``)."""
    worker = await start_worker(config, servicer_factory, engine_factory)
    print(f"{config.role} worker serving on {config.host}:{worker.server.port}", flush=True)
    stop = asyncio.ensure_future(until_stop_signal())
    death = asyncio.ensure_future(worker.die())
    await asyncio.wait({stop, death}, return_when=asyncio.FIRST_COMPLETED)
    if worker.engine.dead is not None:  # dying wins over a stop signal that came too
        stop.cancel()
        return await death
    death.cancel()
    log.info("draining")
    await worker.stop()
    return 0


def main(role: str, servicer_factory: ServicerFactory, argv: list[str] | None = None,
         engine_factory: EngineFactory = LLMEngine) -> int:
    """``python -m {role}_worker``: parse, log, pin, serve until SIGTERM; 2 on a bad
    config, ``EXIT_ENGINE_DIED`` when the engine died."""
    exit_with_parent()
    try:
        config, log_format = parse_invocation(role, argv)
        logs.configure(role, fmt=log_format)
        return asyncio.run(serve(pin(config), servicer_factory, engine_factory))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
