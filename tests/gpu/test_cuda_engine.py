"""The engine on CUDA: the same lifecycle as on CPU, checked against transformers on
the same GPU. Skipped (with the reason) where CUDA is absent; bench/gpu_check.sh runs
them on a GPU machine."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from pdserve.config import EngineConfig
from pdserve.engine.engine import LLMEngine
from pdserve.engine.kv_staging import HostStaging
from pdserve.engine.layer_ops import TorchOps
from pdserve.engine.outputs import RequestOutput
from pdserve.kvwire.codec import Encoding, Int8Rows, encode, quantize_int8
from pdserve.sampling_params import SamplingParams
from tests.engine_helpers import (
    assert_engine_empty,
    assert_follows_until_near_tie,
    generate_all,
    hf_greedy,
    run_all,
)

pytestmark = pytest.mark.gpu

N_NEW = 12
LENGTHS = [1, 5, 16, 17, 40, 100, 150]  # with a 64-token budget: chunks after context too
BF16_TIE = 1.5  # nats below fp32's choice within which bf16 rounding may pick another token


def _prompts(vocab: int, lengths: list[int], seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(n)] for n in lengths]


def _engine(model: Path, dtype: str = "float32", **kw: object) -> LLMEngine:
    return LLMEngine(EngineConfig(model=str(model), dtype=dtype, device="cuda",  # type: ignore[arg-type]
                                  max_num_batched_tokens=64, num_kv_blocks=128, **kw))


def _run(engine: LLMEngine, prompts: list[list[int]], logprobs: int | None = None,
         ) -> list[RequestOutput]:
    params = SamplingParams(temperature=0, max_tokens=N_NEW, min_tokens=N_NEW, logprobs=logprobs)
    return generate_all(engine, prompts, params)


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_qwen2", "tiny_llama3_rope"])
def test_cuda_fp32_greedy_is_token_identical_to_transformers(
        fixture: str, request: pytest.FixtureRequest) -> None:
    model: Path = request.getfixturevalue(fixture)
    engine = _engine(model)
    assert engine.device.type == "cuda" and engine.kv.data.is_cuda
    # Nothing CPU-only on this path: torch ops, no native CPU kernel or fused decode call.
    assert isinstance(engine.model.ops, TorchOps) and engine.model.decode_kernel is None
    assert type(engine.model.wide_ops) is TorchOps  # our wide kernels are CPU only
    prompts = _prompts(engine.spec.vocab_size, LENGTHS)
    # One continuous batch with chunked prefill (budget 64 < the longest prompt).
    ours = [o.token_ids for o in _run(engine, prompts)]
    assert ours == hf_greedy(model, prompts, N_NEW, device="cuda")


def test_cuda_bf16_follows_fp32_until_a_near_tie(tiny_llama: Path) -> None:
    """bf16 on the GPU as on the CPU: each continuation equals fp32's until a near tie
    (bf16's token among fp32's top 5, less than BF16_TIE nats below fp32's choice)."""
    prompts = _prompts(320, LENGTHS, seed=3)
    fp32 = _run(_engine(tiny_llama), prompts, logprobs=5)
    bf16_engine = _engine(tiny_llama, dtype="bfloat16")
    assert bf16_engine.dtype == torch.bfloat16  # native on CUDA: no fp32 compute
    assert_follows_until_near_tie(_run(bf16_engine, prompts), fp32, BF16_TIE)


def test_cuda_sampling_is_reproducible_per_seed(tiny_llama: Path) -> None:
    engine = _engine(tiny_llama)

    def sample(rid: str, seed: int) -> list[int]:
        p = SamplingParams(temperature=1.0, top_p=0.9, top_k=50, max_tokens=20, seed=seed,
                           ignore_eos=True)
        engine.add_request(rid, list(range(10, 40)), p)
        return run_all(engine)[rid].token_ids  # type: ignore[attr-defined]

    a, b, c = sample("a", 7), sample("b", 7), sample("c", 8)
    assert a == b and a != c
    assert engine.sampler.generator(engine.device).device.type == "cuda"
    # A greedy and a sampled request in one batch: each keeps its own result.
    engine.add_request("g", list(range(10, 40)), SamplingParams(temperature=0, max_tokens=20,
                                                               ignore_eos=True))
    engine.add_request("s", list(range(10, 40)), SamplingParams(
        temperature=1.0, top_p=0.9, top_k=50, max_tokens=20, seed=7, ignore_eos=True))
    done = run_all(engine)
    assert done["s"].token_ids == a
    assert_engine_empty(engine)


def test_staged_kv_is_an_exact_pinned_host_copy_once_ready() -> None:
    staging = HostStaging(torch.device("cuda"))
    x = torch.arange(64 * 6 * 64, dtype=torch.float32, device="cuda").view(64, 6, 64)
    want_k, want_v = x[:, :3].cpu(), x[:, 3:].cpu()
    hk, hv, done = staging.stage(x[:, :3], x[:, 3:], Encoding.FP32)  # views, as layers give them
    del x  # freed on the compute stream; record_stream keeps it until the copy ran
    torch.empty(64 * 6 * 64, device="cuda").fill_(-1.0)  # would take the freed memory
    done.synchronize()
    assert hk.is_pinned() and hv.is_pinned() and not hk.is_cuda
    assert torch.equal(hk, want_k) and torch.equal(hv, want_v)


def test_kv_is_quantized_on_the_gpu_before_it_leaves() -> None:
    """int8 on the wire: int8 + scales cross PCIe, and are what the host encoder makes
    from the float rows (to one quantization level: GPU and CPU may round a division's
    last bit apart)."""
    staging = HostStaging(torch.device("cuda"))
    k, v = torch.randn(40, 3, 64, device="cuda"), torch.randn(40, 3, 64, device="cuda")
    hk, hv, done = staging.stage(k, v, Encoding.INT8)
    done.synchronize()
    assert isinstance(hk, Int8Rows) and isinstance(hv, Int8Rows)
    assert hk.q.dtype == torch.int8 and hk.q.is_pinned() and hk.scale.is_pinned()
    for got, x in ((hk, k), (hv, v)):
        ref = quantize_int8(x.cpu())
        torch.testing.assert_close(got.scale, ref.scale, rtol=1e-6, atol=0)
        assert (got.q.int() - ref.q.int()).abs().max() <= 1
    bk, bv, done = staging.stage(k, v, Encoding.BF16)
    done.synchronize()
    assert bk.dtype == torch.bfloat16 and encode(bk, bv, Encoding.BF16) == encode(
        k.cpu(), v.cpu(), Encoding.BF16)
