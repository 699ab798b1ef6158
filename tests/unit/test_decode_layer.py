"""The native per-layer decode call computes what the per-op path computes.

Lifecycle under test: a model loads -> ``decode_kernel`` is chosen (or None where the
weights do not fit) -> each decode-only step runs ``begin(fb)`` then one call per
layer; steps with prefill rows take the per-op path.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pdserve.config import EngineConfig
from pdserve.engine import cpu_kernels
from pdserve.engine.decode_layer import DecodeLayerKernel
from pdserve.engine.engine import LLMEngine
from pdserve.engine.kv_cache import KVCache
from pdserve.engine.model import ForwardBatch, LlamaModel, PrefillSegment, load_hf_config
from pdserve.sampling_params import SamplingParams
from tests.engine_helpers import assert_engine_empty, run_all

BS, BLOCKS = 4, 160
CPU = torch.device("cpu")

kernels = cpu_kernels.load()
pytestmark = pytest.mark.skipif(kernels is None or not hasattr(kernels, "decode_layer"),
                                reason="CPU kernels unavailable here")


def _model(path: Path, dtype: torch.dtype, quantization: str | None = None) -> LlamaModel:
    # kernels=cpu: the fixed plan (up to 8 rows take our kernels on every CPU; auto
    # measures that crossover per machine).
    return LlamaModel(path, load_hf_config(path), dtype, CPU, kernels="cpu",
                      quantization=quantization)


def _pool(model: LlamaModel, dtype: torch.dtype = torch.float32) -> KVCache:
    s = model.spec
    kv = KVCache(s.num_layers, BLOCKS, BS, s.num_kv_heads, s.head_dim, dtype, CPU)
    kv.data.copy_(torch.randn(kv.data.shape, generator=torch.Generator().manual_seed(1)))
    return kv


def _decode_batch(lens: list[int], vocab: int, seed: int) -> ForwardBatch:
    """One decode row per request with ``lens`` tokens (incl. the new one), blocks shuffled."""
    gen = torch.Generator().manual_seed(seed)
    nb = -(-max(lens) // BS)
    tables = torch.randperm(BLOCKS, generator=gen)[: nb * len(lens)].view(len(lens), nb)
    seq_lens = torch.tensor(lens)
    positions = seq_lens - 1
    slots = tables.gather(1, (positions // BS)[:, None])[:, 0] * BS + positions % BS
    return ForwardBatch(
        input_ids=torch.randint(3, vocab, (len(lens),), generator=gen), positions=positions,
        slot_mapping=slots, num_decode=len(lens), decode_block_tables=tables,
        decode_seq_lens=seq_lens, prefills=[], logits_indices=torch.arange(len(lens)))


def _step(model: LlamaModel, fb: ForwardBatch, native: bool,
          pool: torch.dtype = torch.float32) -> tuple[torch.Tensor, KVCache, list[torch.Tensor]]:
    """(logits, pool after the step, each layer's k|v the hook saw) by one path."""
    kernel = model.decode_kernel
    model.decode_kernel = kernel if native else None
    kv, seen = _pool(model, pool), []
    try:
        logits = model.forward(fb, kv, lambda i, k, v: seen.append(torch.cat([k, v]).clone()))
    finally:
        model.decode_kernel = kernel
    return logits, kv, seen


@pytest.mark.parametrize(("dtype", "quantization", "pool"), [
    (torch.float32, None, torch.float32), (torch.bfloat16, None, torch.float32),
    (torch.bfloat16, None, torch.bfloat16), (torch.bfloat16, "int8", torch.bfloat16)])
@pytest.mark.parametrize("lens", [[1], [9, 2, 30], [5, 17, 1, 64, 33, 8, 12, 50]])
def test_native_step_matches_per_op_step(tiny_llama: Path, dtype: torch.dtype,
                                         quantization: str | None, pool: torch.dtype,
                                         lens: list[int]) -> None:
    model = _model(tiny_llama, dtype, quantization)
    assert isinstance(model.decode_kernel, DecodeLayerKernel)  # STEP 1: chosen at load
    fb = _decode_batch(lens, model.spec.vocab_size, seed=len(lens))
    assert model.decode_kernel.applies(fb)
    # STEP 2: the same decode step by both paths, each on its own copy of one pool.
    ref_logits, ref_kv, ref_seen = _step(model, fb, native=False, pool=pool)
    logits, kv, seen = _step(model, fb, native=True, pool=pool)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
    assert logits.argmax(-1).tolist() == ref_logits.argmax(-1).tolist()
    torch.testing.assert_close(kv.data.float(), ref_kv.data.float(), rtol=1e-5, atol=1e-5)
    assert len(seen) == len(ref_seen) == model.spec.num_layers
    for a, b in zip(seen, ref_seen, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_steps_with_prefill_rows_or_unfit_weights_take_the_per_op_path(
        tiny_llama: Path, tiny_qwen2: Path) -> None:
    model = _model(tiny_llama, torch.bfloat16)
    assert model.decode_kernel is not None
    fb = _decode_batch([3, 4], model.spec.vocab_size, seed=0)
    fb.prefills.append(PrefillSegment(2, 5, 0, torch.tensor([7, 8])))
    assert not model.decode_kernel.applies(fb)
    assert _model(tiny_qwen2, torch.float32).decode_kernel is None  # qkv bias
    torch_ops = LlamaModel(tiny_llama, load_hf_config(tiny_llama), torch.float32, CPU,
                           kernels="torch")
    assert torch_ops.decode_kernel is None


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_greedy_generation_is_identical_by_both_paths(tiny_llama: Path, dtype: str) -> None:
    prompts = [[5, 9, 40, 7], list(range(3, 40)), [11] * 19]
    params = SamplingParams(temperature=0, max_tokens=24, min_tokens=24)
    outs = []
    for native in (True, False):
        engine = LLMEngine(EngineConfig(model=str(tiny_llama), dtype=dtype, num_kv_blocks=64))
        assert (engine.model.decode_kernel is not None) is True
        if not native:
            engine.model.decode_kernel = None
        for i, p in enumerate(prompts):
            engine.add_request(str(i), p, params)
        done = run_all(engine)
        outs.append([done[str(i)].token_ids for i in range(len(prompts))])  # type: ignore[attr-defined]
        assert_engine_empty(engine)
    assert outs[0] == outs[1]
