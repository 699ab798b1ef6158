"""The AVX-512 BF16 prefill attention (csrc/prefill_attention.cpp): the attention of a
first chunk within bf16 rounding of torch's, taken by wide bf16 steps where it was
built; absent (and unwarned) from builds for other ISA levels."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from pdserve.config import EngineConfig
from pdserve.engine import kernel_check
from pdserve.engine.attention import causal_self_attention
from pdserve.engine.engine import LLMEngine
from pdserve.sampling_params import SamplingParams
from tests.engine_helpers import assert_follows_until_near_tie, generate_all
from tests.tiny_models import build_tokenizer

CHECKED = kernel_check.verified()
BUILT = CHECKED is not None and CHECKED.module.compiled_isa() == "avx512bf16"
needs_build = pytest.mark.skipif(not BUILT, reason="needs a kernel build for AVX-512 BF16")


def test_the_kernel_exists_only_in_avx512_bf16_builds() -> None:
    if CHECKED is None:
        pytest.skip("no CPU kernels here")
    assert CHECKED.has("causal_attention_bf16") == BUILT


@needs_build
@pytest.mark.parametrize(("n", "heads", "kv_heads"), [(1, 9, 3), (16, 4, 4), (17, 4, 2),
                                                      (130, 9, 3), (600, 2, 1)])
def test_within_bf16_rounding_of_torch(n: int, heads: int, kv_heads: int) -> None:
    assert CHECKED is not None
    g = torch.Generator().manual_seed(n)
    # Views of one qkv row per token, as the forward pass hands them over.
    qkv = (torch.randn(n, heads + 2 * kv_heads, 64, generator=g) * 2).to(torch.bfloat16)
    q, k, v = qkv[:, :heads], qkv[:, heads:heads + kv_heads], qkv[:, heads + kv_heads:]
    ref = causal_self_attention(q.float(), k.float(), v.float(), 0.125)
    ours = CHECKED.module.causal_attention_bf16(q, k, v, 0.125)
    theirs = causal_self_attention(q, k, v, 0.125)  # torch's own bf16
    assert ours.shape == (n, heads * 64) and ours.dtype == torch.bfloat16
    err, torch_err = (ours.float() - ref).abs().max(), (theirs.float() - ref).abs().max()
    assert err <= 2 * torch_err + 1e-3, f"ours {err:.4f}, torch's bf16 {torch_err:.4f}"


def _head_dim_64_model(root: Path) -> Path:
    from transformers import AutoModelForCausalLM, LlamaConfig

    tok = build_tokenizer(root)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=256, intermediate_size=512,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(7)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # sharper distributions, fewer greedy ties
        for p in model.parameters():
            p.mul_(3.0)
    model.save_pretrained(root, safe_serialization=True)
    return root


@needs_build
def test_wide_steps_take_it_and_keep_the_tokens(tmp_path: Path,
                                               caplog: pytest.LogCaptureFixture) -> None:
    model = _head_dim_64_model(tmp_path)
    cfg = EngineConfig(model=str(model), dtype="bfloat16", num_kv_blocks=64, kernels="cpu")
    with caplog.at_level(logging.WARNING):
        engine = LLMEngine(cfg)
    assert engine.model.causal_kernel is not None
    assert not [r for r in caplog.records if "causal_attention" in r.getMessage()]
    prompts = [list(range(5, 205)), list(range(40, 60))]  # first chunks of a wide step
    params = SamplingParams(temperature=0, max_tokens=10, logprobs=5)

    ours = generate_all(engine, prompts, params)
    engine.model.causal_kernel = None
    assert_follows_until_near_tie(ours, generate_all(engine, prompts, params))
