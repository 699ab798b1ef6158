"""The process around a prefill or decode worker: pin, load, serve, drain on SIGTERM.

Pinning is pdserve/placement.py's: explicit ``--cpus``, else next to the GPU, else
worker ``--slot`` of ``--slots`` spread over this machine's NUMA nodes and CPUs.

STARTING (health NOT_SERVING while the model loads) → SERVING → DRAINING (SIGTERM
or SIGINT: health NOT_SERVING, in-flight calls get a grace period) → STOPPED.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import time
from dataclasses import dataclass, replace

from pdserve import placement
from pdserve.config import PREFILL_FALLBACKS, EngineConfig, WorkerConfig
from pdserve.engine.async_engine import AsyncEngine
from pdserve.engine.engine import LLMEngine
from pdserve.grpc_server import Server, exit_with_parent, until_stop_signal
from pdserve.malloc_tuning import keep_freed_memory
from pdserve.metrics import WorkerMetrics
from pdserve.placement import PlacementRequest

log = logging.getLogger("pdserve.worker")


def parse_args(role: str, argv: list[str] | None = None) -> WorkerConfig:
    p = argparse.ArgumentParser(prog=f"python -m {role}_worker")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=50061 if role == "prefill" else 50071)
    p.add_argument("--metrics-port", type=int, default=0)
    p.add_argument("--model", default=None)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--cpus", default=None, help="comma-separated CPU ids to pin to")
    p.add_argument("--pin", default="auto", help="auto (see pdserve/placement.py) or off")
    p.add_argument("--slot", type=int, default=0,
                   help="this worker's index among --slots workers on this machine")
    p.add_argument("--slots", type=int, default=1)
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--kv-cache-gb", type=float, default=1.0)
    # A prefill worker has no decode batch to keep responsive: whole 2,048-token
    # chunks (bigger GEMMs, and 1.5 MB KV messages instead of 0.4 MB ones).
    p.add_argument("--max-num-batched-tokens", type=int,
                   default=2048 if role == "prefill" else 512)
    p.add_argument("--kv-encoding", default="model")
    p.add_argument("--prefill-fallback", default="local", choices=list(PREFILL_FALLBACKS),
                   help="decode: what to do when the prefill worker is unreachable or dies")
    a = p.parse_args(argv)
    cpus = tuple(int(c) for c in a.cpus.split(",")) if a.cpus else None
    engine = EngineConfig(model=a.model, dtype=a.dtype, device=a.device, num_threads=a.threads,
                          kv_cache_gb=a.kv_cache_gb,
                          max_num_batched_tokens=a.max_num_batched_tokens)
    placement = PlacementRequest(role=role, mode=a.pin, cpus=cpus, slot=a.slot, slots=a.slots,
                                 threads=a.threads, gpu=a.device != "cpu")
    return WorkerConfig(role=role, engine=engine, host=a.host, port=a.port,
                        metrics_port=a.metrics_port, placement=placement,
                        kv_encoding=a.kv_encoding, prefill_fallback=a.prefill_fallback)


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


async def start_worker(config: WorkerConfig) -> RunningWorker:
    """Bind, load the model (health NOT_SERVING meanwhile), then serve."""
    keep_freed_memory()  # before the KV stream's buffers come and go
    service = ("pdserve.v1.PrefillWorker" if config.role == "prefill"
               else "pdserve.v1.DecodeWorker")
    server = Server(config.host, config.port, [service])
    servicer = _add_servicer(server, config)  # gRPC needs services before start
    await server.start()
    await server.set_serving(False)
    engine = AsyncEngine(await asyncio.to_thread(LLMEngine, config.engine))
    engine.start()
    metrics = WorkerMetrics(engine.engine.spec.name, config.role)
    e = engine.engine
    metrics.watch(lambda: len(e.scheduler.running), lambda: len(e.scheduler.waiting),
                  lambda: e.blocks.usage)
    metrics.serve(config.host, config.metrics_port)
    servicer.attach(engine, metrics)
    await server.set_serving(True)
    return RunningWorker(server, engine, metrics)


async def serve(config: WorkerConfig) -> None:
    worker = await start_worker(config)
    print(f"{config.role} worker serving on {config.host}:{worker.server.port}", flush=True)
    await until_stop_signal()
    log.info("draining")
    await worker.stop()


def _add_servicer(server: Server, config: WorkerConfig):  # type: ignore[no-untyped-def]
    if config.role == "prefill":
        from prefill_worker.servicer import PrefillServicer

        servicer = PrefillServicer(config)
    else:
        from decode_worker.servicer import DecodeServicer

        servicer = DecodeServicer(config)  # type: ignore[assignment]
    servicer.register(server.server)
    return servicer


def main(role: str, argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format=f"%(asctime)s {role} %(levelname)s %(name)s: %(message)s")
    exit_with_parent()
    try:
        config = pin(parse_args(role, argv))
        asyncio.run(serve(config))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
