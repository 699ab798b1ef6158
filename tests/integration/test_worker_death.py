"""A worker whose engine dies takes its process with it: health NOT_SERVING on every
service name, each open call ends UNAVAILABLE "engine died: …" (never UNKNOWN), one
error line with the traceback, then exit 70 so it is restarted. A real decode
worker process (tiny model) whose model runner fails its 4th step
(tests/faulting_engine.py)."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pdserve._proto.pdserve.v1 import common_pb2, worker_pb2, worker_pb2_grpc
from pdserve.launch import wait_serving
from pdserve.worker_host import EXIT_ENGINE_DIED
from tests.integration.front_door import free_port

NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVICES = ["", "pdserve.v1.DecodeWorker"]


def _start(tiny_llama: Path, port: int, log: Path) -> subprocess.Popen[bytes]:
    argv = [sys.executable, "-m", "tests.faulting_engine", "decode", "--steps-ok", "3",
            "--model", str(tiny_llama), "--dtype", "float32", "--port", str(port),
            "--kv-cache-gb", "0.01", "--pin", "off", "--threads", "1", "--log-format", "json"]
    with open(log, "wb") as err:
        return subprocess.Popen(argv, stderr=err)


def test_engine_death_ends_calls_unavailable_then_exits_70(
        tiny_llama: Path, tmp_path: Path) -> None:
    port, log = free_port(), tmp_path / "decode.log"
    proc = _start(tiny_llama, port, log)
    try:
        wait_serving(f"127.0.0.1:{port}", 120, [proc])
        codes, details, seen = asyncio.run(_generate_while_watching(f"127.0.0.1:{port}"))
        assert proc.wait(timeout=60) == EXIT_ENGINE_DIED
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert codes == [grpc.StatusCode.UNAVAILABLE] * 2, details
    assert all(d == "engine died: RuntimeError: injected fault in step 4" for d in details)
    assert seen == {name: NOT_SERVING for name in SERVICES}
    errors = [line for line in log.read_text().splitlines() if '"level": "ERROR"' in line]
    assert len(errors) == 1, errors
    assert "engine died" in errors[0] and "Traceback" in errors[0]


async def _generate_while_watching(
        address: str) -> tuple[list[grpc.StatusCode], list[str], dict[str, int]]:
    """Two streams that the death cuts short, while a Watch on each service name
    records the first status after SERVING."""
    async with grpc.aio.insecure_channel(address) as ch:
        health = health_pb2_grpc.HealthStub(ch)
        watches = {name: health.Watch(health_pb2.HealthCheckRequest(service=name), timeout=60)
                   for name in SERVICES}
        for w in watches.values():  # SERVING first: the watches are in place
            assert (await w.read()).status == health_pb2.HealthCheckResponse.SERVING
        params = common_pb2.SamplingParams(max_tokens=50, temperature=0, ignore_eos=True)
        calls = [worker_pb2_grpc.DecodeWorkerStub(ch).Generate(worker_pb2.DecodeRequest(
            request_id=f"r{i}", prompt_token_ids=list(range(5, 25)), params=params), timeout=60)
            for i in range(2)]
        ends = await asyncio.gather(*(_drain(c) for c in calls))
        seen = {name: (await w.read()).status for name, w in watches.items()}
        for w in watches.values():
            w.cancel()
    return [c for c, _ in ends], [d for _, d in ends], seen


async def _drain(call: grpc.aio.UnaryStreamCall) -> tuple[grpc.StatusCode, str]:
    try:
        async for _ in call:
            pass
    except grpc.aio.AioRpcError as e:
        return e.code(), e.details() or ""
    return grpc.StatusCode.OK, ""
