"""The fused bf16 kernels of wide steps (wide_ops.py, csrc/wide_ops.cpp) compute what
TorchOps computes in bf16, and a wide step through them keeps TorchOps' tokens.

The native-bf16 plan is forced for the engine test so that wide steps run bf16 on any
CPU (test_step_precision.py does the same)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from pdserve.config import EngineConfig
from pdserve.engine import kernel_check, linear
from pdserve.engine.engine import LLMEngine
from pdserve.engine.kv_cache import KVCache
from pdserve.engine.layer_ops import TorchOps
from pdserve.engine.outputs import RequestOutput
from pdserve.engine.rope import RotaryEmbedding
from pdserve.engine.wide_ops import WIDE_KERNEL_OF, WideCpuOps, wide_layer_ops
from pdserve.sampling_params import SamplingParams
from tests.engine_helpers import assert_follows_until_near_tie, generate_all

BF16 = torch.bfloat16
checked = kernel_check.verified()
pytestmark = pytest.mark.skipif(checked is None, reason="CPU kernels unavailable here")
PROMPTS = [list(range(5, 45)), list(range(50, 53)), [7] * 20]  # 40 and 20 rows: wide


def _both(heads: int, kv_heads: int, hd: int) -> tuple[TorchOps, WideCpuOps]:
    assert checked is not None
    config = SimpleNamespace(rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    rope = RotaryEmbedding(config, hd, 256, torch.float32, torch.device("cpu"))
    return TorchOps(rope, heads, kv_heads), WideCpuOps(checked.module, rope, heads, kv_heads)


def test_self_check_passed_every_wide_kernel() -> None:
    assert checked is not None
    assert set(WIDE_KERNEL_OF.values()) <= checked.ok


@pytest.mark.parametrize("n,d", [(5, 48), (7, 37), (64, 576)])
def test_rms_norm_bf16_adds_delta_in_place_and_normalizes(n: int, d: int) -> None:
    ref, ours = _both(1, 1, 8)
    x, delta = torch.randn(n, d).to(BF16), torch.randn(n, d).to(BF16)
    w = torch.randn(d)  # fp32, as the model keeps it: both round it to bf16
    x_ref, h_ref = ref.rms_norm(x.clone(), w, 1e-5, delta)
    x_ours = x.clone()
    x_out, h_ours = ours.rms_norm(x_ours, w, 1e-5, delta)
    assert x_out is x_ours and h_ours.dtype == BF16
    torch.testing.assert_close(x_ours, x_ref, rtol=0, atol=0)  # one bf16 add: exact
    torch.testing.assert_close(h_ours, h_ref)  # bf16 tolerance: the mean's sum order
    torch.testing.assert_close(ours.rms_norm(x, w, 1e-5)[1], ref.rms_norm(x, w, 1e-5)[1])


@pytest.mark.parametrize("n,inter", [(3, 37), (16, 48), (9, 1536)])
def test_silu_mul_bf16_matches_torch(n: int, inter: int) -> None:
    ref, ours = _both(1, 1, 8)
    gate_up = (torch.randn(n, 2 * inter) * 4).to(BF16)
    torch.testing.assert_close(ours.silu_mul(gate_up), ref.silu_mul(gate_up))


@pytest.mark.parametrize("heads,kv_heads,hd", [(4, 2, 20), (9, 3, 64), (3, 1, 6)])
def test_rope_store_bf16_rotates_in_place_and_fills_the_fp32_pool(
        heads: int, kv_heads: int, hd: int) -> None:
    n, gen = 11, torch.Generator().manual_seed(0)
    fb = SimpleNamespace(positions=torch.randint(0, 256, (n,), generator=gen),
                         slot_mapping=torch.randperm(64, generator=gen)[:n])
    qkv = torch.randn(n, (heads + 2 * kv_heads) * hd, generator=gen).to(BF16)
    results = []
    for ops in _both(heads, kv_heads, hd):
        kv = KVCache(1, 16, 4, kv_heads, hd, torch.float32, torch.device("cpu"))
        results.append((*ops.rope_store(qkv.clone(), fb, kv, 0), kv.data))  # type: ignore[arg-type]
    for ref, ours in zip(*results, strict=True):
        # torch's bf16 RoPE rounds after each product, difference and sum; ours too: exact.
        torch.testing.assert_close(ours, ref, rtol=0, atol=0)


def test_a_dropped_or_unsuited_kernel_runs_torch() -> None:
    ref, ours = _both(1, 1, 8)
    ours.use = frozenset({"rope_store_kv_bf16"})  # rms_norm_bf16 and silu_mul_bf16 dropped
    x, w = torch.randn(4, 40).to(BF16), torch.randn(40)
    delta = torch.randn(4, 40).to(BF16)
    x_out, _ = ours.rms_norm(x, w, 1e-5, delta)
    assert x_out is not x  # TorchOps: a new residual
    ours.use = frozenset(WIDE_KERNEL_OF.values())
    xf = x.float()
    torch.testing.assert_close(ours.rms_norm(xf, w, 1e-5)[1], ref.rms_norm(xf, w, 1e-5)[1])


def test_wide_layer_ops_applies_only_to_bf16_cpu_steps_with_kernels() -> None:
    config = SimpleNamespace(rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    rope = RotaryEmbedding(config, 16, 64, torch.float32, torch.device("cpu"))
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    args = (rope, 4, 2)
    assert isinstance(wide_layer_ops("cpu", *args, BF16, cpu, 64, 128), WideCpuOps)
    assert type(wide_layer_ops("torch", *args, BF16, cpu, 64, 128)) is TorchOps
    assert type(wide_layer_ops("cpu", *args, torch.float32, cpu, 64, 128)) is TorchOps
    assert type(wide_layer_ops("cpu", *args, BF16, cuda, 64, 128)) is TorchOps


@pytest.fixture
def native_bf16(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(linear, "native_low_precision", lambda device: True)


def _generate(model: Path, torch_wide_ops: bool, logprobs: int | None = None,
              ) -> list[RequestOutput]:
    engine = LLMEngine(EngineConfig(model=str(model), dtype="bfloat16", num_kv_blocks=64,
                                    max_num_batched_tokens=64, kernels="cpu"))
    m = engine.model
    assert isinstance(m.wide_ops, WideCpuOps) and m.wide_ops.use == set(WIDE_KERNEL_OF.values())
    if torch_wide_ops:
        m.wide_ops = m.wide_ops.torch
    params = SamplingParams(temperature=0, max_tokens=12, min_tokens=12, logprobs=logprobs)
    return generate_all(engine, PROMPTS, params)  # asserts every block free at the end


@pytest.mark.parametrize("model", ["tiny_llama", "tiny_qwen2", "tiny_llama3_rope"])
def test_wide_steps_through_our_kernels_follow_torch_ops(
        model: str, native_bf16: None, request: pytest.FixtureRequest) -> None:
    path = request.getfixturevalue(model)  # qwen2: a qkv bias; llama3: scaled RoPE tables
    ref = _generate(path, torch_wide_ops=True, logprobs=5)
    assert_follows_until_near_tie(_generate(path, torch_wide_ops=False), ref)


class _Broken:
    """The kernel module with some kernels replaced by wrong ones."""

    def __init__(self, module: object, **wrong: object) -> None:
        self._module, self._wrong = module, wrong

    def __getattr__(self, name: str) -> object:
        return self._wrong.get(name, getattr(self._module, name))


def test_the_self_check_drops_a_wrong_wide_kernel() -> None:
    assert checked is not None
    m = checked.module
    broken = _Broken(
        m,
        rms_norm_bf16=lambda x, delta, w, eps: m.rms_norm_bf16(x, None, w, eps),  # no delta
        silu_mul_bf16=lambda g: m.silu_mul_bf16(g.contiguous()) * 1.05,  # off by 5%
        rope_store_kv_bf16=lambda qkv, *a: None)  # stores nothing
    ok = kernel_check.check(broken).ok
    assert not ok & set(WIDE_KERNEL_OF.values())
    no_weight = _Broken(m, rms_norm_bf16=lambda x, delta, w, eps: m.rms_norm_bf16(
        x, delta, torch.ones_like(w), eps))
    assert "rms_norm_bf16" not in kernel_check.check(no_weight).ok
