"""Greedy parity with transformers on the real default model, 20 prompts in one batch.

fp32: token-identical, except at near ties (the reference token is in our top-2
and the two logprobs differ by under 1e-3); the number of ties is reported.
bf16: the share of first-32-token continuations identical to the fp32 reference is
reported; what is asserted holds on any CPU. bf16 arithmetic differs between CPUs
(AVX2 widens bf16 weights to fp32; AVX-512 BF16 computes activations in bf16 too),
so which near ties flip, and so the share, moves from machine to machine (one
AVX-512 box: 9/20, where transformers' own bf16 got 11/20). What must hold
anywhere: each bf16 continuation follows our fp32 one until a near tie, i.e. at the
first difference bf16's token is among fp32's top 5 and fp32 put it less than
``BF16_TIE`` nats below its choice (this AVX2 box: 19/20 identical, the one flip
at 0.012 nats). A broken bf16 path leaves fp32's top tokens at once.
Figures are written to ``bench/results/parity.json``.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from pdserve.config import EngineConfig
from pdserve.engine.engine import LLMEngine
from pdserve.engine.outputs import RequestOutput
from pdserve.sampling_params import SamplingParams
from tests.engine_helpers import first_difference, generate_all, hf_greedy

N_NEW = 64
QUESTIONS = [
    "What is the capital of France?", "Write a haiku about the sea.",
    "Explain what a KV cache is in one paragraph.", "List three prime numbers.",
    "How do I reverse a list in Python?", "Who wrote Hamlet?",
]
TEXTS = [
    "The quick brown fox", "Once upon a time, in a small village by the river,",
    "def fibonacci(n):", "import numpy as np\n\n", "1, 2, 3, 5, 8, 13,",
    "The mitochondria is",
]
RANDOM_LENGTHS = [1, 3, 50, 300, 700, 1200, 1600, 2000]
BF16_TIE = 1.5  # nats below fp32's choice within which bf16 rounding may pick another token
RESULTS = Path(__file__).resolve().parents[2] / "bench" / "results" / "parity.json"


def _prompts(engine: LLMEngine) -> list[list[int]]:
    tok = engine.tokenizer
    chat = [list(tok.apply_chat_template([{"role": "user", "content": q}],  # type: ignore[attr-defined]
                                         add_generation_prompt=True, tokenize=True,
                                         return_dict=False)) for q in QUESTIONS]
    raw = [engine.tokenize(t) for t in TEXTS]
    rng = random.Random(0)
    rand = [[rng.randrange(engine.spec.vocab_size) for _ in range(n)] for n in RANDOM_LENGTHS]
    return chat + raw + rand


def _generate(engine: LLMEngine, prompts: list[list[int]], logprobs: int | None) -> list:
    params = SamplingParams(temperature=0, max_tokens=N_NEW, min_tokens=N_NEW, logprobs=logprobs)
    return generate_all(engine, prompts, params)


@pytest.mark.integration
def test_fp32_greedy_matches_transformers_and_bf16_share(default_model_dir: Path) -> None:
    engine = LLMEngine(EngineConfig(model=str(default_model_dir), dtype="float32",
                                    max_num_batched_tokens=512))
    prompts = _prompts(engine)
    assert len(prompts) == 20 and max(map(len, prompts)) == 2000
    ours = _generate(engine, prompts, logprobs=5)
    ref = hf_greedy(default_model_dir, prompts, N_NEW)
    ties = []
    for i, (o, r) in enumerate(zip(ours, ref, strict=True)):
        pos = first_difference(o.token_ids, r)
        if pos is None:
            continue
        top = dict(o.logprobs[pos].top[:2])  # our top-2 at the first difference
        assert r[pos] in top, f"prompt {i}: reference token {r[pos]} not in our top-2 at {pos}"
        gap = abs(top[o.token_ids[pos]] - top[r[pos]])
        assert gap < 1e-3, f"prompt {i}: not a near tie at {pos} (logprob gap {gap:.2e})"
        ties.append({"prompt": i, "position": pos, "gap": gap})
    del engine

    bf16 = LLMEngine(EngineConfig(model=str(default_model_dir), dtype="bfloat16"))
    ours16 = _generate(bf16, prompts, logprobs=None)
    same32 = sum(o.token_ids[:32] == r[:32] for o, r in zip(ours16, ref, strict=True))
    flips = [f for i, (o16, o) in enumerate(zip(ours16, ours, strict=True))
             if (f := _bf16_flip(i, o16.token_ids[:32], o)) is not None]
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({
        "prompts": len(prompts), "new_tokens": N_NEW,
        "fp32_identical": len(prompts) - len(ties), "fp32_near_ties": ties,
        "bf16_identical_first32_share": same32 / len(prompts),
        "bf16_first_differences_from_fp32": flips,
    }, indent=2) + "\n")
    print(f"fp32: {len(prompts) - len(ties)}/20 identical, {len(ties)} near ties; "
          f"bf16 first-32 identical: {same32}/20; bf16 flips (fp32 gap, nats): "
          f"{[round(f['gap'], 3) for f in flips]}")
    for f in flips:
        assert f["gap"] < BF16_TIE, f"bf16 left fp32's answer at a non-tie: {f}"


def _bf16_flip(i: int, bf16: list[int], fp32: RequestOutput) -> dict[str, float] | None:
    """Where bf16's tokens first leave our fp32 run's, and how far below fp32's choice
    bf16's token was there (same prefix up to that point, so fp32's logprobs apply)."""
    ids = fp32.token_ids
    pos = first_difference(bf16, ids[:len(bf16)])
    if pos is None:
        return None
    top = dict(fp32.logprobs[pos].top)
    gap = top[ids[pos]] - top.get(bf16[pos], float("-inf"))
    return {"prompt": i, "position": pos, "gap": gap}
