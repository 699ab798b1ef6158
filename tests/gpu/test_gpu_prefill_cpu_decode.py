"""Cloud prefill, local decode on one machine: a prefill worker on CUDA streams each
layer's KV over real gRPC to a decode worker on the CPU, which imports it unchanged.
In fp32 the tokens are exactly those of the CPU-only cluster."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import pytest

from decode_worker.servicer import DecodeServicer
from pdserve._proto.pdserve.v1 import common_pb2, worker_pb2
from pdserve.config import EngineConfig, WorkerConfig
from pdserve.placement import PlacementRequest
from pdserve.worker_host import RunningWorker, start_worker
from prefill_worker.servicer import PrefillServicer
from tests.engine_helpers import read_decode_stream, wait_engines_empty

pytestmark = pytest.mark.gpu

PARAMS = common_pb2.SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
LENGTHS = [3, 40, 130, 300]  # 300 > the 64-token budget: chunks after context


def _config(model: Path, role: str, device: str) -> WorkerConfig:
    # kernels="torch": the CPU side in both clusters runs the same ops, and no native
    # kernels are compiled on the GPU machine.
    engine = EngineConfig(model=str(model), dtype="float32", device=device, num_kv_blocks=128,
                          max_num_batched_tokens=64, kernels="torch")
    return WorkerConfig(role=role, engine=engine, port=0,
                        placement=PlacementRequest(role=role, mode="off"))


async def _generate(decode: RunningWorker, prefill: RunningWorker, prompt: list[int], rid: str,
                    encoding: int = 0) -> tuple[list[int], worker_pb2.DecodeResponse]:
    req = worker_pb2.DecodeRequest(request_id=rid, prompt_token_ids=prompt, params=PARAMS,
                                   prefill_address=prefill.address, encoding=encoding)
    return await read_decode_stream(decode.address, req)


async def _cluster_tokens(model: Path, prefill_device: str, prompts: list[list[int]],
                          ) -> tuple[list[list[int]], list[worker_pb2.DecodeResponse]]:
    p = await start_worker(_config(model, "prefill", prefill_device), PrefillServicer)
    d = await start_worker(_config(model, "decode", "cpu"), DecodeServicer)
    try:
        assert p.engine.engine.device.type == prefill_device
        assert d.engine.engine.device.type == "cpu"
        runs = await asyncio.gather(*(_generate(d, p, x, f"r{i}") for i, x in enumerate(prompts)))
        await wait_engines_empty(p.engine.engine, d.engine.engine)
        return [t for t, _ in runs], [f for _, f in runs]
    finally:
        await d.stop(0)
        await p.stop(0)


def test_gpu_prefill_to_cpu_decode_gives_the_cpu_clusters_tokens(tiny_llama: Path) -> None:
    rng = random.Random(0)
    prompts = [[rng.randrange(3, 320) for _ in range(n)] for n in LENGTHS]

    async def scenario() -> None:
        cpu_only, _ = await _cluster_tokens(tiny_llama, "cpu", prompts)
        gpu_to_cpu, firsts = await _cluster_tokens(tiny_llama, "cuda", prompts)
        assert gpu_to_cpu == cpu_only
        for f, x in zip(firsts, prompts, strict=True):  # the KV crossed: 2 layers x K and V
            assert f.kv_bytes == 2 * 2 * len(x) * 2 * 16 * 4 and f.prefill_compute_s > 0

    asyncio.run(scenario())


def test_gpu_prefill_streams_int8_kv_to_a_cpu_decode_worker(tiny_llama: Path) -> None:
    """int8 on the wire from the GPU: a quarter of the fp32 bytes, and the request decodes."""
    prompt = list(range(5, 205))

    async def scenario() -> None:
        p = await start_worker(_config(tiny_llama, "prefill", "cuda"), PrefillServicer)
        d = await start_worker(_config(tiny_llama, "decode", "cpu"), DecodeServicer)
        try:
            fp32, f32 = await _generate(d, p, prompt, "fp32")
            int8, f8 = await _generate(d, p, prompt, "int8", encoding=common_pb2.KV_ENCODING_INT8)
            assert len(int8) == len(fp32) == PARAMS.max_tokens
            assert f8.kv_bytes < f32.kv_bytes / 3
            await wait_engines_empty(p.engine.engine, d.engine.engine)
        finally:
            await d.stop(0)
            await p.stop(0)

    asyncio.run(scenario())
