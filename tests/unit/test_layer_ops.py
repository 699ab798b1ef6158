"""pdserve's fused CPU kernels compute what the torch reference ops compute."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
import torch

from pdserve.engine import cpu_kernels
from pdserve.engine.kv_cache import KVCache
from pdserve.engine.layer_ops import CpuKernelOps, TorchOps, layer_ops
from pdserve.engine.rope import RotaryEmbedding

H, KVH, HD, BS, BLOCKS = 6, 2, 20, 4, 96  # hd 20: exercises the non-multiple-of-8 tails

kernels = cpu_kernels.load()
pytestmark = pytest.mark.skipif(kernels is None, reason="CPU kernels unavailable here")


def _both() -> tuple[TorchOps, CpuKernelOps]:
    config = SimpleNamespace(rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    rope = RotaryEmbedding(config, HD, 256, torch.float32, torch.device("cpu"))
    return TorchOps(rope, H, KVH), CpuKernelOps(kernels, rope, H, KVH)


def _batch(lens: list[int], gen: torch.Generator) -> Any:
    """Decode rows of requests with ``lens`` tokens (incl. the new one), blocks shuffled."""
    nb = -(-max(lens) // BS)
    perm = torch.randperm(BLOCKS, generator=gen)[: nb * len(lens)].view(len(lens), nb)
    seq_lens = torch.tensor(lens)
    positions = seq_lens - 1
    slots = perm.gather(1, (positions // BS)[:, None])[:, 0] * BS + positions % BS
    return SimpleNamespace(positions=positions, slot_mapping=slots, decode_block_tables=perm,
                           decode_seq_lens=seq_lens)


def test_rms_norm_with_and_without_residual() -> None:
    ref, ker = _both()
    x, delta, w = torch.randn(5, 48), torch.randn(5, 48), torch.randn(48)
    x_ref, h_ref = ref.rms_norm(x.clone(), w, 1e-5, delta)
    x_ker, h_ker = ker.rms_norm(x.clone(), w, 1e-5, delta)
    torch.testing.assert_close(x_ker, x_ref)
    torch.testing.assert_close(h_ker, h_ref)
    torch.testing.assert_close(ker.rms_norm(x, w, 1e-5)[1], ref.rms_norm(x, w, 1e-5)[1])


def test_rope_store_and_decode_attention_match_torch() -> None:
    gen = torch.Generator().manual_seed(0)
    ref, ker = _both()
    fb = _batch([1, 7, 16, 33, 61], gen)
    pools = []
    for ops in (ref, ker):
        kv = KVCache(1, BLOCKS, BS, KVH, HD, torch.float32, torch.device("cpu"))
        kv.data.copy_(torch.randn(kv.data.shape, generator=torch.Generator().manual_seed(1)))
        qkv = torch.randn(5, (H + 2 * KVH) * HD, generator=torch.Generator().manual_seed(2))
        q, k, v = ops.rope_store(qkv, fb, kv, 0)
        pools.append((q.clone(), k.clone(), v.clone(), kv.data.clone(),
                      ops.decode_attention(q, kv, 0, fb, HD**-0.5)))
    for a, b in zip(pools[0], pools[1], strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


def test_config_names_choose_the_implementation() -> None:
    ref, _ = _both()
    cpu = torch.device("cpu")
    assert isinstance(layer_ops("torch", ref.rope, H, KVH, torch.float32, cpu), TorchOps)
    assert isinstance(layer_ops("auto", ref.rope, H, KVH, torch.float32, cpu), CpuKernelOps)
    assert isinstance(layer_ops("auto", ref.rope, H, KVH, torch.bfloat16, cpu), TorchOps)
    with pytest.raises(ValueError, match="kernels"):
        layer_ops("cpu", ref.rope, H, KVH, torch.bfloat16, cpu)
    with pytest.raises(ValueError, match="kernels must be one of"):
        layer_ops("fast", ref.rope, H, KVH, torch.float32, cpu)


def test_silu_mul_matches_torch() -> None:
    ref, ker = _both()
    gate_up = torch.randn(3, 2 * 37)
    torch.testing.assert_close(ker.silu_mul(gate_up), ref.silu_mul(gate_up))


@pytest.mark.parametrize("n, k", [(13, 64), (6, 32), (20, 48), (7, 40)])  # packed x3, row-major
@pytest.mark.parametrize("m", [1, 2, 3, 4, 7, 11])  # the 4-, 2- and 1-row paths and their mixes
def test_bf16_weight_kernel_matches_fp32_matmul_on_the_same_weights(n: int, k: int, m: int) -> None:
    from pdserve.engine.linear import Linear

    w, x = torch.randn(n, k), torch.randn(m, k)
    lin = Linear(w, None, torch.bfloat16, torch.float32, kernels="cpu")
    assert lin._kernel is not None
    expected = x @ w.to(torch.bfloat16).float().T
    torch.testing.assert_close(lin(x), expected, rtol=1e-5, atol=1e-5)
