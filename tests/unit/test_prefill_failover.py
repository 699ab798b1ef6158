"""Prefill failover over real gRPC (tiny model, one process): a prefill worker that
goes silent after its header, or answers RESOURCE_EXHAUSTED, is the peer's fault:
the decode worker asks the next candidate the router named, then prefills locally,
within seconds; with ``prefill_fallback=fail`` the call fails UNAVAILABLE naming
the prefill workers and blaming the prefill role (never "decode worker full").
Every path ends with every block free on both workers."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import grpc
import pytest

from decode_worker.servicer import DecodeServicer
from pdserve._proto.pdserve.v1 import common_pb2, worker_pb2, worker_pb2_grpc
from pdserve.config import EngineConfig, WorkerConfig
from pdserve.engine.engine import LLMEngine
from pdserve.sampling_params import SamplingParams
from pdserve.worker_errors import failed_role
from pdserve.worker_host import RunningWorker, start_worker
from prefill_worker.servicer import PrefillServicer
from tests.engine_helpers import read_decode_stream, run_all, wait_engines_empty

PROMPT = list(range(5, 75))
PARAMS = common_pb2.SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)


def _config(model: Path, role: str, **kw: object) -> WorkerConfig:
    engine = EngineConfig(model=str(model), dtype="float32", num_kv_blocks=64,
                          max_num_batched_tokens=32)
    return replace(WorkerConfig(role=role, engine=engine, port=0), **kw)  # type: ignore[arg-type]


def _offline(model: Path) -> list[int]:
    e = LLMEngine(EngineConfig(model=str(model), dtype="float32", num_kv_blocks=64))
    e.add_request("x", PROMPT, SamplingParams(max_tokens=10, temperature=0, ignore_eos=True))
    return run_all(e)["x"].token_ids  # type: ignore[attr-defined]


class SilentPrefill(worker_pb2_grpc.PrefillWorkerServicer):
    """Relays a real prefill worker's first ``send`` messages, then says nothing more
    (a stalled worker: SIGSTOP, a wedged engine) until the call is cancelled."""

    def __init__(self, real_address: str, send: int) -> None:
        self.real_address, self.send = real_address, send
        self.cancelled = asyncio.Event()

    async def Prefill(self, request, context) -> AsyncIterator[worker_pb2.PrefillResponse]:  # noqa: N802
        async with grpc.aio.insecure_channel(self.real_address) as ch:
            msgs = [m async for m in worker_pb2_grpc.PrefillWorkerStub(ch).Prefill(request)]
        for msg in msgs[:self.send]:
            yield msg
        try:
            await asyncio.Event().wait()
        finally:
            self.cancelled.set()


class FullPrefill(worker_pb2_grpc.PrefillWorkerServicer):
    async def Prefill(self, request, context) -> AsyncIterator[worker_pb2.PrefillResponse]:  # noqa: N802
        await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "prefill worker full: no blocks")
        yield worker_pb2.PrefillResponse()  # never reached: makes this a stream handler


async def _serve(servicer: worker_pb2_grpc.PrefillWorkerServicer) -> tuple[grpc.aio.Server, str]:
    server = grpc.aio.server()
    worker_pb2_grpc.add_PrefillWorkerServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, f"127.0.0.1:{port}"


async def _generate(decode: RunningWorker, candidates: list[str], rid: str,
                    ) -> tuple[list[int], worker_pb2.DecodeResponse]:
    req = worker_pb2.DecodeRequest(request_id=rid, prompt_token_ids=PROMPT, params=PARAMS,
                                   plan=worker_pb2.PLAN_REMOTE, prefill_address=candidates[0],
                                   fallback_prefill_addresses=candidates[1:])
    return await read_decode_stream(decode.address, req)


async def _settled(*workers: RunningWorker) -> None:
    await wait_engines_empty(*(w.engine.engine for w in workers))


def test_a_silent_prefill_worker_hands_over_to_the_next_then_to_local(tiny_llama: Path) -> None:
    expected = _offline(tiny_llama)

    async def scenario() -> None:
        p = await start_worker(_config(tiny_llama, "prefill"), PrefillServicer)
        d = await start_worker(_config(tiny_llama, "decode", kv_idle_timeout_s=1.0),
                               DecodeServicer)
        silent = SilentPrefill(p.address, send=1)  # the header, then nothing
        server, silent_address = await _serve(silent)
        try:
            t0 = time.monotonic()
            tokens, first = await _generate(d, [silent_address, p.address], "next")
            assert tokens == expected and first.kv_bytes > 0  # the KV came from p
            assert time.monotonic() - t0 < 30  # seconds, not the 120 s prefill timeout
            await asyncio.wait_for(silent.cancelled.wait(), 5)  # its call was cancelled
            tokens, first = await _generate(d, [silent_address], "local")
            assert tokens == expected and first.kv_bytes == 0  # prefilled on d
            assert d.metrics.kv_failures._value.get() == 2
            await _settled(p, d)
        finally:
            await server.stop(0)
            await d.stop(0)
            await p.stop(0)

    asyncio.run(scenario())


def test_a_full_prefill_worker_is_retried_elsewhere_and_never_reads_as_decode_full(
        tiny_llama: Path) -> None:
    expected = _offline(tiny_llama)

    async def scenario() -> None:
        p = await start_worker(_config(tiny_llama, "prefill"), PrefillServicer)
        strict = await start_worker(_config(tiny_llama, "decode", prefill_fallback="fail",
                                            kv_idle_timeout_s=1.0), DecodeServicer)
        server, full = await _serve(FullPrefill())
        silent_server, silent = await _serve(SilentPrefill(p.address, send=0))
        try:
            tokens, first = await _generate(strict, [full, p.address], "retried")
            assert tokens == expected and first.kv_bytes > 0
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await _generate(strict, [full, silent], "failed")
            details = e.value.details() or ""
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE, details
            assert full in details and silent in details and "RESOURCE_EXHAUSTED" in details
            assert "decode worker full" not in details
            assert failed_role(e.value.trailing_metadata()) == "prefill"
            await _settled(p, strict)
        finally:
            await silent_server.stop(0)
            await server.stop(0)
            await strict.stop(0)
            await p.stop(0)

    asyncio.run(scenario())
