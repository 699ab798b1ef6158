"""A decode worker killed (SIGKILL) mid-stream: the router moves the request to the
other decode worker with the prompt plus the tokens streamed so far, and the client
sees one stream whose greedy tokens are exactly those of an undisturbed run.

Real processes for the decode workers (the tiny model), the router and a prefill
worker in this process, real gRPC on free ports."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from decode_worker.servicer import DecodeServicer  # noqa: F401  (the module the processes run)
from pdserve._proto.pdserve.v1 import api_pb2, api_pb2_grpc, common_pb2
from pdserve.config import EngineConfig, RouterConfig, WorkerConfig
from pdserve.worker_host import start_worker
from prefill_worker.servicer import PrefillServicer
from router.policy import LoadAwarePolicy
from router.server import Router, start_router

PROMPT = list(range(5, 45))  # 40 tokens: REMOTE (the router has a prefill worker)
MAX_TOKENS = 400
KILL_AFTER = 8  # tokens received before the serving decode worker is killed


def _spawn_decode(model: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "decode_worker", "--model", str(model), "--port", "0",
         "--dtype", "float32", "--device", "cpu", "--pin", "off", "--threads", "1",
         "--kv-cache-gb", "0.05", "--log-format", "json"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])})


def _address(proc: subprocess.Popen[str]) -> str:
    """The address the worker prints once it serves."""
    assert proc.stdout is not None
    for line in proc.stdout:
        if "worker serving on" in line:
            return line.rsplit(" ", 1)[1].strip()
    raise RuntimeError(f"decode worker exited with {proc.wait()}")


@pytest.fixture()
def decode_workers(tiny_llama: Path) -> Iterator[list[tuple[subprocess.Popen[str], str]]]:
    procs = [_spawn_decode(tiny_llama) for _ in range(2)]  # both load at once
    try:
        yield [(p, _address(p)) for p in procs]
    finally:
        for p in procs:
            p.kill()
            p.wait(timeout=30)


async def _generate(router: Router, rid: str, on_token: int = -1,
                    at_token: object = None) -> tuple[list[int], str, api_pb2.GenerateResponse]:
    params = common_pb2.SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)
    req = api_pb2.GenerateRequest(request_id=rid, token_ids=api_pb2.TokenIds(ids=PROMPT),
                                  params=params)
    tokens: list[int] = []
    text = ""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{router.grpc.port}") as ch:
        last = None
        async for msg in api_pb2_grpc.GenerationStub(ch).Generate(req, timeout=120):
            tokens += msg.token_ids
            text += msg.text
            last = msg
            if len(tokens) >= on_token > 0 and at_token is not None:
                at_token()  # type: ignore[operator]
                at_token = None
    assert last is not None
    return tokens, text, last


def _serving(router: Router) -> str:
    """The decode worker the router has the one request in flight on."""
    policy = router.generator.policy
    assert isinstance(policy, LoadAwarePolicy)
    busy = [m.address for m in policy.decode if m.in_flight_requests]
    assert len(busy) == 1, busy
    return busy[0]


def test_a_decode_worker_killed_mid_stream_is_invisible_to_the_client(
        tiny_llama: Path, decode_workers: list[tuple[subprocess.Popen[str], str]]) -> None:
    procs = {address: proc for proc, address in decode_workers}

    async def scenario() -> None:
        engine = EngineConfig(model=str(tiny_llama), dtype="float32", num_kv_blocks=128)
        prefill = await start_worker(WorkerConfig(role="prefill", engine=engine), PrefillServicer)
        router = await start_router(RouterConfig(
            port=0, http_port=0, model=str(tiny_llama), decode=tuple(procs),
            prefill=(prefill.address,), health_interval_s=0.2, policy="load_aware"))
        try:
            calm, calm_text, calm_last = await _generate(router, "undisturbed")
            killed: list[str] = []

            def kill() -> None:
                address = _serving(router)
                procs[address].send_signal(signal.SIGKILL)
                killed.append(address)

            moved, moved_text, last = await _generate(router, "migrated", KILL_AFTER, kill)
            assert killed and procs[killed[0]].wait(timeout=10) == -signal.SIGKILL
            assert len(moved) == MAX_TOKENS and moved == calm  # nothing lost, nothing twice
            assert moved_text == calm_text
            assert (last.finish_reason, last.usage.prompt_tokens, last.usage.completion_tokens) \
                == (calm_last.finish_reason, len(PROMPT), MAX_TOKENS)
            migrations = router.generator.metrics.registry.get_sample_value(
                "pdserve:request_migrations_total",
                {"model_name": router.generator.model_id, "role": "router"})
            assert migrations == 1
            assert router.generator.running == 0
        finally:
            await router.drain(0)
            await prefill.stop(0)

    asyncio.run(scenario())
