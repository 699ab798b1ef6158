"""Prefill and decode workers over real gRPC on localhost (tiny model, one process)."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
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
from pdserve.worker_host import RunningWorker, start_worker
from prefill_worker.servicer import PrefillServicer
from tests.engine_helpers import read_decode_stream, run_all, wait_engines_empty

PROMPT = list(range(5, 75))
PARAMS = common_pb2.SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)


def _config(model: Path, role: str) -> WorkerConfig:
    engine = EngineConfig(model=str(model), dtype="float32", num_kv_blocks=64,
                          max_num_batched_tokens=32)
    return WorkerConfig(role=role, engine=engine, port=0)


async def _generate(decode: RunningWorker, prefill_address: str = "",
                    rid: str = "r", encoding: int = 0,
                    timeout: float | None = 30) -> tuple[list[int], worker_pb2.DecodeResponse]:
    req = worker_pb2.DecodeRequest(request_id=rid, prompt_token_ids=PROMPT, params=PARAMS,
                                   prefill_address=prefill_address, encoding=encoding)
    return await read_decode_stream(decode.address, req, timeout)


def _offline(model: Path) -> list[int]:
    e = LLMEngine(EngineConfig(model=str(model), dtype="float32", num_kv_blocks=64))
    e.add_request("x", PROMPT, SamplingParams(max_tokens=10, temperature=0, ignore_eos=True))
    return run_all(e)["x"].token_ids  # type: ignore[attr-defined]


async def _settled(*workers: RunningWorker) -> None:
    await wait_engines_empty(*(w.engine.engine for w in workers))


def test_remote_and_local_plans_match_the_offline_engine(tiny_llama: Path) -> None:
    expected = _offline(tiny_llama)

    async def scenario() -> None:
        p = await start_worker(_config(tiny_llama, "prefill"), PrefillServicer)
        d = await start_worker(_config(tiny_llama, "decode"), DecodeServicer)
        try:
            remote, first = await _generate(d, p.address, "a")
            assert remote == expected
            assert first.kv_bytes > 0 and first.kv_bytes == p.metrics.kv_bytes._value.get()
            local, _ = await _generate(d, "", "b")
            assert local == expected
            int8, first8 = await _generate(d, p.address, "c", encoding=4)
            assert first8.kv_bytes < first.kv_bytes / 3  # int8 vs fp32 on the wire
            await _settled(p, d)
        finally:
            await d.stop(0)
            await p.stop(0)

    asyncio.run(scenario())


class HostilePrefill(worker_pb2_grpc.PrefillWorkerServicer):
    """Delegates to a real prefill worker, then breaks the stream as told."""

    def __init__(self, real_address: str, mode: str) -> None:
        self.real_address, self.mode = real_address, mode

    async def Prefill(self, request, context) -> AsyncIterator[worker_pb2.PrefillResponse]:  # noqa: N802
        async with grpc.aio.insecure_channel(self.real_address) as ch:
            msgs = [m async for m in worker_pb2_grpc.PrefillWorkerStub(ch).Prefill(request)]
        header, chunks, last = msgs[0], msgs[1:-1], msgs[-1]
        m = self.mode
        if m == "other_model":
            header.header.num_layers += 1
        elif m == "crc":
            chunks[1].chunk.k = bytes([chunks[1].chunk.k[0] ^ 0xFF]) + chunks[1].chunk.k[1:]
        elif m == "truncated":
            chunks = chunks[:-1]
        elif m == "reordered":
            chunks[0], chunks[1] = chunks[1], chunks[0]
        elif m == "shape":
            chunks[0].chunk.k = chunks[0].chunk.k[:-4]
            chunks[0].chunk.v = chunks[0].chunk.v[:-4]
        elif m == "dtype":
            chunks[0].chunk.encoding = common_pb2.KV_ENCODING_FP16
        for msg in [header, *chunks, last]:
            yield msg


@pytest.mark.parametrize(("mode", "code"), [
    ("other_model", grpc.StatusCode.FAILED_PRECONDITION),
    ("crc", grpc.StatusCode.DATA_LOSS),
    ("truncated", grpc.StatusCode.DATA_LOSS),
    ("reordered", grpc.StatusCode.DATA_LOSS),
    ("shape", grpc.StatusCode.INVALID_ARGUMENT),
    ("dtype", grpc.StatusCode.INVALID_ARGUMENT),
])
def test_broken_prefill_peer_fails_one_request_and_frees_blocks(
        tiny_llama: Path, mode: str, code: grpc.StatusCode) -> None:
    expected = _offline(tiny_llama)

    async def scenario() -> None:
        p = await start_worker(_config(tiny_llama, "prefill"), PrefillServicer)
        d = await start_worker(_config(tiny_llama, "decode"), DecodeServicer)
        hostile = grpc.aio.server()
        worker_pb2_grpc.add_PrefillWorkerServicer_to_server(HostilePrefill(p.address, mode), hostile)
        port = hostile.add_insecure_port("127.0.0.1:0")
        await hostile.start()
        try:
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await _generate(d, f"127.0.0.1:{port}", "bad")
            assert e.value.code() == code, e.value.details()
            assert e.value.details()
            await _settled(p, d)
            good, _ = await _generate(d, p.address, "good")  # the worker keeps serving
            assert good == expected
            await _settled(p, d)
        finally:
            await hostile.stop(0)
            await d.stop(0)
            await p.stop(0)

    asyncio.run(scenario())


def test_unreachable_prefill_fails_or_falls_back_and_deadline(tiny_llama: Path) -> None:
    expected = _offline(tiny_llama)

    async def scenario() -> None:
        strict = await start_worker(replace(_config(tiny_llama, "decode"), prefill_fallback="fail"),
                                    DecodeServicer)
        d = await start_worker(_config(tiny_llama, "decode"), DecodeServicer)  # prefill_fallback="local"
        try:
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await _generate(strict, "127.0.0.1:1", "x")
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "127.0.0.1:1" in (e.value.details() or "")
            tokens, first = await _generate(d, "127.0.0.1:1", "x")
            assert tokens == expected and first.kv_bytes == 0
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await _generate(d, "", "y", timeout=0.001)
            assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            await _settled(strict, d)
        finally:
            await d.stop(0)
            await strict.stop(0)

    asyncio.run(scenario())


def test_prefill_process_killed_mid_transfer_decode_prefills_locally(tiny_llama: Path) -> None:
    expected = _offline(tiny_llama)

    async def scenario() -> None:
        p = await start_worker(_config(tiny_llama, "prefill"), PrefillServicer)
        d = await start_worker(_config(tiny_llama, "decode"), DecodeServicer)
        dying = subprocess.Popen([sys.executable, "-m", "tests.dying_prefill",
                                  "--upstream", p.address, "--chunks", "3"],
                                 stdout=subprocess.PIPE, text=True)
        try:
            assert dying.stdout is not None
            port = int(await asyncio.to_thread(dying.stdout.readline))
            tokens, first = await _generate(d, f"127.0.0.1:{port}", "chaos")
            assert dying.wait(timeout=10) == -signal.SIGKILL  # it did die mid-stream
            assert tokens == expected and first.kv_bytes == 0  # prefilled on d
            assert d.metrics.kv_failures._value.get() == 1
            await _settled(p, d)
        finally:
            dying.kill()
            await d.stop(0)
            await p.stop(0)

    asyncio.run(scenario())


def test_two_prefill_calls_with_one_request_id_both_complete(tiny_llama: Path) -> None:
    """A retry (or a relayed copy) of a request can reach a prefill worker while an
    earlier call of it is still there: each call is its own engine request (found by
    the chaos bench: the second got INVALID_ARGUMENT "already in use")."""

    async def prefill(address: str) -> list[worker_pb2.PrefillResponse]:
        async with grpc.aio.insecure_channel(address) as ch:
            req = worker_pb2.PrefillRequest(request_id="same", prompt_token_ids=PROMPT,
                                            params=PARAMS)
            return [m async for m in worker_pb2_grpc.PrefillWorkerStub(ch).Prefill(req)]

    async def main() -> None:
        p = await start_worker(_config(tiny_llama, "prefill"), PrefillServicer)
        try:
            a, b = await asyncio.gather(prefill(p.address), prefill(p.address))
            assert a[-1].first_token.token.token_id == b[-1].first_token.token.token_id
            # Header, chunks, first token (the later one may read the other's blocks
            # from the prefix cache: fewer, larger chunks).
            assert min(len(a), len(b)) > 2
            await _settled(p)
        finally:
            await p.stop(0)

    asyncio.run(main())
