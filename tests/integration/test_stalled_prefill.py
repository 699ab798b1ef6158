"""A prefill worker frozen by SIGSTOP (the finding: a request hung ~120 s): the decode
worker gives up on it after ``kv_idle_timeout_s`` plus a health probe it cannot
answer and prefills locally, so the request completes within seconds with the
same tokens; the router then sees the prefill worker down and plans LOCAL.

A real prefill worker process (the tiny model), the decode worker and the router
in this process, real gRPC on free ports."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc

from decode_worker.servicer import DecodeServicer
from pdserve._proto.pdserve.v1 import api_pb2, api_pb2_grpc, common_pb2
from pdserve.config import EngineConfig, RouterConfig, WorkerConfig
from pdserve.worker_host import start_worker
from router.health import WorkerState
from router.server import Router, start_router

PROMPT = list(range(5, 45))  # 40 tokens: REMOTE while the prefill worker is up


def _spawn_prefill(model: Path) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "prefill_worker", "--model", str(model), "--port", "0",
         "--dtype", "float32", "--device", "cpu", "--pin", "off", "--threads", "1",
         "--kv-cache-gb", "0.05", "--log-format", "json"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])})
    assert proc.stdout is not None
    for line in proc.stdout:
        if "worker serving on" in line:
            return proc, line.rsplit(" ", 1)[1].strip()
    raise RuntimeError(f"prefill worker exited with {proc.wait()}")


async def _generate(router: Router) -> tuple[list[int], api_pb2.GenerateResponse, float]:
    params = common_pb2.SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    req = api_pb2.GenerateRequest(token_ids=api_pb2.TokenIds(ids=PROMPT), params=params)
    t0 = time.monotonic()
    tokens: list[int] = []
    async with grpc.aio.insecure_channel(f"127.0.0.1:{router.grpc.port}") as ch:
        last = None
        async for msg in api_pb2_grpc.GenerationStub(ch).Generate(req, timeout=120):
            tokens += msg.token_ids
            last = msg
    assert last is not None
    return tokens, last, time.monotonic() - t0


def test_a_frozen_prefill_worker_costs_seconds_not_minutes(tiny_llama: Path) -> None:
    prefill, address = _spawn_prefill(tiny_llama)

    async def scenario() -> None:
        engine = EngineConfig(model=str(tiny_llama), dtype="float32", num_kv_blocks=128)
        decode = await start_worker(WorkerConfig(role="decode", engine=engine,
                                                 kv_idle_timeout_s=2.0), DecodeServicer)
        router = await start_router(RouterConfig(
            port=0, http_port=0, model=str(tiny_llama), decode=(decode.address,),
            prefill=(address,), health_interval_s=0.5, policy="load_aware"))
        try:
            calm, last, _ = await _generate(router)
            assert last.timings.plan == "remote" and last.timings.kv_bytes > 0
            prefill.send_signal(signal.SIGSTOP)
            frozen, last, took = await _generate(router)
            assert frozen == calm and last.timings.kv_bytes == 0  # prefilled on decode
            assert took < 30, took  # idle 2 s + probe 1 s, plus a loaded box
            while router.prefill_health.state(address) is not WorkerState.DOWN:
                await asyncio.sleep(0.1)
            later, last, _ = await _generate(router)
            assert later == calm and last.timings.plan == "local"
            assert not decode.engine.engine.requests and decode.engine.engine.blocks.all_free()
        finally:
            await router.drain(0)
            await decode.stop(0)

    try:
        asyncio.run(scenario())
    finally:
        prefill.send_signal(signal.SIGCONT)
        prefill.kill()
        prefill.wait(timeout=30)
