"""Chunked-prefill attention: exact against the masked reference, through torch's tiled
CPU kernel, and without building anything of the chunk x keys size."""

from __future__ import annotations

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from pdserve.engine import attention

H, KVH, HD, BS = 6, 2, 32, 16  # grouped-query attention: 3 query heads per KV head


def _case(num_context: int, n: int, dtype: torch.dtype, seed: int = 0) -> tuple:
    """A pool whose blocks are scattered, the chunk's table, and the flat K/V it holds."""
    g = torch.Generator().manual_seed(seed)
    nb = -(-(num_context + n) // BS)
    k_cache = torch.randn(nb + 4, BS, KVH, HD, generator=g).to(dtype)
    v_cache = torch.randn(nb + 4, BS, KVH, HD, generator=g).to(dtype)
    table = torch.randperm(nb + 4, generator=g)[:nb]
    k = k_cache.index_select(0, table).view(-1, KVH, HD)[: num_context + n]  # (T, kvh, hd)
    v = v_cache.index_select(0, table).view(-1, KVH, HD)[: num_context + n]
    q = torch.randn(n, H, HD, generator=g).to(dtype)
    return q, k, v, k_cache, v_cache, table


def _reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_context: int) -> torch.Tensor:
    """fp32, repeated KV heads, an explicit bottom-right causal mask."""
    n = q.shape[0]
    qh = q.float().transpose(0, 1)[None]
    kh = k.float().repeat_interleave(H // KVH, 1).transpose(0, 1)[None]
    vh = v.float().repeat_interleave(H // KVH, 1).transpose(0, 1)[None]
    mask = torch.ones(n, k.shape[0], dtype=torch.bool).tril(num_context)
    out = torch.nn.functional.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask,
                                                           scale=HD**-0.5)
    return out[0].transpose(0, 1).reshape(n, H * HD)


@pytest.mark.parametrize(("num_context", "n"), [(0, 9), (5, 7), (16, 16), (37, 50), (100, 1)])
def test_prefill_attention_equals_the_masked_reference_in_fp32(num_context: int, n: int) -> None:
    q, k, v, k_cache, v_cache, table = _case(num_context, n, torch.float32)
    out = attention.prefill_attention(q, k[num_context:], v[num_context:], k_cache, v_cache,
                                      table, num_context, HD**-0.5)
    assert out.shape == (n, H * HD) and out.dtype == torch.float32
    torch.testing.assert_close(out, _reference(q, k, v, num_context), rtol=1e-5, atol=1e-5)


def test_prefill_attention_in_bf16_is_within_bf16_rounding() -> None:
    q, k, v, k_cache, v_cache, table = _case(40, 24, torch.bfloat16)
    out = attention.prefill_attention(q, k[40:], v[40:], k_cache, v_cache, table, 40, HD**-0.5)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), _reference(q, k, v, 40), rtol=2e-2, atol=2e-2)


def test_a_chunk_after_context_runs_tiled_and_builds_nothing_chunk_by_keys() -> None:
    # A mask (n x T, then converted to floats by SDPA) grows with the whole prompt at
    # every chunk; the two-part form builds nothing of that size and never runs the
    # math (full score matrix) kernel.
    num_context, n = 192, 64
    q, k, v, k_cache, v_cache, table = _case(num_context, n, torch.float32)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        attention.prefill_attention(q, k[num_context:], v[num_context:], k_cache, v_cache,
                                    table, num_context, HD**-0.5)
    events = list(prof.events())
    names = {e.name for e in events}
    assert "aten::_scaled_dot_product_flash_attention_for_cpu" in names
    assert not any("math" in name for name in names)
    total = num_context + n
    shapes = [s for e in events for s in e.input_shapes if s]
    assert [n, total] not in shapes and [total, n] not in shapes


@pytest.mark.parametrize(("num_context", "n"), [(0, 9), (37, 50), (100, 1)])
def test_the_gpu_form_is_the_same_attention(num_context: int, n: int) -> None:
    """``fused_causal_attention`` (what CUDA runs: widened KV heads, a bottom-right
    causal bias SDPA's fused kernels apply by tiles) computed here on the CPU."""
    q, k, v, *_ = _case(num_context, n, torch.float32)
    qh = q.transpose(0, 1)[None]
    kh, vh = k.transpose(0, 1)[None], v.transpose(0, 1)[None]  # (1, kvh, T, hd)
    out = attention.fused_causal_attention(qh, kh, vh, HD**-0.5)[0].transpose(0, 1)
    torch.testing.assert_close(out.reshape(n, H * HD), _reference(q, k, v, num_context),
                               rtol=1e-5, atol=1e-5)
