"""The engine's greedy output equals transformers' on tiny random models (fp32)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from pdserve.config import EngineConfig
from pdserve.engine.engine import LLMEngine
from pdserve.sampling_params import SamplingParams
from tests.engine_helpers import assert_engine_empty, hf_greedy, run_all

N_NEW = 12


def _prompts(vocab: int, lengths: list[int], seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(n)] for n in lengths]


def _engine(model: Path, **kw: object) -> LLMEngine:
    return LLMEngine(EngineConfig(model=str(model), dtype="float32", **kw))  # type: ignore[arg-type]


def _run(engine: LLMEngine, prompts: list[list[int]]) -> list[list[int]]:
    params = SamplingParams(temperature=0, max_tokens=N_NEW, min_tokens=N_NEW)
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, params)
    done = run_all(engine)
    return [done[str(i)].token_ids for i in range(len(prompts))]  # type: ignore[attr-defined]


@pytest.mark.parametrize("kernels", ["auto", "torch", "cpu"])
@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_qwen2", "tiny_llama3_rope"])
def test_mixed_batch_matches_transformers(fixture: str, kernels: str,
                                          request: pytest.FixtureRequest) -> None:
    model: Path = request.getfixturevalue(fixture)
    engine = _engine(model, max_num_batched_tokens=64, num_kv_blocks=128, kernels=kernels)
    prompts = _prompts(engine.spec.vocab_size, [1, 5, 16, 17, 40, 100, 150])
    # STEP 1: one continuous batch with chunked prefill (budget 64 < longest prompt).
    ours = _run(engine, prompts)
    # STEP 2: the oracle, one prompt at a time.
    assert ours == hf_greedy(model, prompts, N_NEW)
    assert_engine_empty(engine)


def test_pool_ten_times_too_small_preempts_and_still_matches(tiny_llama: Path) -> None:
    # 16 requests x (60 + 12) tokens ~ 80 blocks of 16; the pool has 8.
    engine = _engine(tiny_llama, num_kv_blocks=8, max_model_len=128)
    prompts = _prompts(engine.spec.vocab_size, [60] * 16, seed=1)
    ours = _run(engine, prompts)
    assert ours == hf_greedy(tiny_llama, prompts, N_NEW)
    assert_engine_empty(engine)


def test_preemption_happened_when_pool_is_short(tiny_llama: Path) -> None:
    engine = _engine(tiny_llama, num_kv_blocks=8, max_model_len=128)
    prompts = _prompts(engine.spec.vocab_size, [50] * 4, seed=2)
    params = SamplingParams(temperature=0, max_tokens=60, ignore_eos=True)
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, params)
    preempted = 0
    while engine.has_unfinished_requests:
        preempted += sum(o.timings.num_preemptions > 0 for o in engine.step()  # type: ignore[union-attr]
                         if o.finished)
    assert preempted > 0
    assert_engine_empty(engine)
