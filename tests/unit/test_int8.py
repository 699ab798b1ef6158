"""int8 weight-only quantization per group of 32: the quantizer's grids, the kernel and
the large-batch path against an fp32 matmul on the dequantized weights, the engine
against the same model with weights pre-rounded to int8, and the config's validation."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from pdserve.config import EngineConfig
from pdserve.engine import cpu_kernels, int8_linear, linear
from pdserve.engine.engine import LLMEngine
from pdserve.engine.int8_linear import GROUP, Int8Linear, dequantize_int8, quantize_int8
from pdserve.engine.linear import Linear
from pdserve.sampling_params import SamplingParams
from pdserve.worker_args import parse_args, worker_argv
from tests.engine_helpers import assert_engine_empty, run_all

needs_kernels = pytest.mark.skipif(cpu_kernels.load() is None, reason="no CPU kernels here")


def _dequantized(w: torch.Tensor) -> torch.Tensor:
    return dequantize_int8(*quantize_int8(w, "w"))


def _case(m: int, n: int, k: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(m, k, generator=g), torch.randn(n, k, generator=g)


def test_a_q4_1_block_is_represented_exactly() -> None:
    # GGUF Q4_1: 32 values d * j + m, j in 0..15; they sit on every 17th level of the
    # asymmetric grid, so only the fp16 rounding of scale and zero remains.
    g = torch.Generator().manual_seed(0)
    d = torch.rand(8, 4, 1, generator=g) * 0.01 + 1e-3
    m = -torch.rand(8, 4, 1, generator=g) * 0.1
    j = torch.randint(0, 16, (8, 4, GROUP), generator=g)
    j[..., 0], j[..., 1] = 0, 15  # each block spans its whole range, as Q4_1's do
    w = (d * j + m).reshape(8, 4 * GROUP)
    q, scales, zeros, shift = quantize_int8(w, "w")
    assert q.dtype == torch.int8 and scales.dtype == zeros.dtype == torch.float16
    assert scales.shape == zeros.shape == (8, 4)
    assert ((q.view(8, 4, GROUP).int() + 128) % 17 == 0).all()  # the Q4 levels
    err = (dequantize_int8(q, scales, zeros, shift) - w).abs().max()
    # fp16 scale and zero: well under half a bf16 ulp of the block's largest value (2e-3)
    assert err < 6e-4 * w.abs().max()


def test_a_q8_0_block_takes_the_symmetric_grid_exactly() -> None:
    g = torch.Generator().manual_seed(1)
    d = (torch.rand(4, 3, 1, generator=g) * 0.01).half().float()  # Q8_0 stores d in fp16
    j = torch.randint(-127, 128, (4, 3, GROUP), generator=g)
    j[..., 0] = 127
    w = (d * j).reshape(4, 3 * GROUP)
    q, scales, zeros, shift = quantize_int8(w, "w")
    assert (zeros == 0).all()
    assert torch.equal(dequantize_int8(q, scales, zeros, shift), w)


def test_quantize_a_constant_and_a_zero_group() -> None:
    w = torch.cat([torch.full((2, GROUP), 0.25), torch.zeros(2, GROUP)], dim=1)
    assert torch.equal(_dequantized(w), w)


def test_in_features_not_a_multiple_of_the_group_is_a_value_error() -> None:
    with pytest.raises(ValueError, match=r"quantization: .*groups of 32.*mlp\.down_proj"):
        quantize_int8(torch.randn(4, 40), "mlp.down_proj.weight")


@needs_kernels
@pytest.mark.parametrize("k", [64, 96])  # 96: an odd number of groups
@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 7, 11])
def test_kernel_equals_fp32_matmul_on_dequantized_weights(m: int, k: int) -> None:
    x, w = _case(m, 50, k)  # N = 50: not a multiple of the 6-row block either
    w[:, :GROUP] += 2.0  # an off-zero group: the asymmetric grid, zeros in the kernel
    lin = Int8Linear(w, None, torch.float32, kernels="cpu")
    assert m <= int8_linear.INT8_SMALL_BATCH and lin._kernel is not None
    y = lin(x)
    assert y.shape == (m, 50) and y.dtype == torch.float32
    torch.testing.assert_close(y, x @ _dequantized(w).T, rtol=1e-5, atol=1e-4)


@needs_kernels
def test_kernel_takes_bf16_activations_and_a_bias() -> None:
    x, w = _case(3, 18, 64)
    b = torch.randn(18)
    lin = Int8Linear(w, b, torch.bfloat16, kernels="cpu")
    assert lin._kernel is not None
    y = lin(x.bfloat16())
    assert y.dtype == torch.bfloat16
    ref = x.bfloat16().float() @ _dequantized(w).T + b.bfloat16().float()
    torch.testing.assert_close(y.float(), ref, rtol=2e-2, atol=5e-2)


@pytest.mark.parametrize("k", [64, 96])
def test_large_batch_path_dequantizes_in_parts_into_one_scratch(
        k: int, monkeypatch: pytest.MonkeyPatch) -> None:
    part = 4 * 6 * k  # 4 blocks of 6 padded rows: 62 rows in 3 parts
    monkeypatch.setattr(int8_linear, "_SCRATCH_ELEMS", part)
    x, w = _case(int8_linear.INT8_SMALL_BATCH + 5, 62, k)
    w[:, :GROUP] -= 1.0
    scratch = int8_linear.DequantScratch()
    lin = Int8Linear(w, None, torch.float32, scratch)
    torch.testing.assert_close(lin(x), x @ _dequantized(w).T, rtol=1e-5, atol=1e-4)
    assert scratch._buf is not None and scratch._buf.numel() == part


def test_without_the_kernel_every_batch_takes_the_torch_path() -> None:
    x, w = _case(2, 20, 64)
    lin = Int8Linear(w, None, torch.float32)
    lin._kernel = None  # what a CUDA device or a machine without the kernels gets
    torch.testing.assert_close(lin(x), x @ _dequantized(w).T, rtol=1e-5, atol=1e-4)


def test_int8_reads_a_byte_and_an_eighth_per_weight() -> None:
    w = torch.randn(60, 64)
    assert Int8Linear(w, None, torch.float32).read_bytes == 60 * 64 + 2 * 2 * 60 * 2
    assert Linear(w, None, torch.float32, torch.float32).read_bytes == 60 * 64 * 4


def _prerounded(model: Path, out: Path) -> Path:
    """A copy of ``model`` whose int8-quantized weights are replaced by their dequantized
    fp32 values: what an exact int8 engine computes, in plain fp32."""
    shutil.copytree(model, out)
    for f in out.glob("*.safetensors"):
        tensors = load_file(f)
        for name, t in tensors.items():
            if name.endswith("_proj.weight") or (name == "lm_head.weight" and linear.INT8_LM_HEAD):
                tensors[name] = _dequantized(t).contiguous()
        save_file(tensors, f)
    return out


def _greedy(engine: LLMEngine, prompts: list[list[int]], n: int) -> list[list[int]]:
    params = SamplingParams(temperature=0, max_tokens=n, min_tokens=n)
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, params)
    done = run_all(engine)
    assert_engine_empty(engine)
    return [done[str(i)].token_ids for i in range(len(prompts))]  # type: ignore[attr-defined]


def test_int8_engine_generates_what_prerounded_fp32_weights_generate(
        tiny_llama: Path, tmp_path: Path) -> None:
    # Prompts of 5-70 tokens: short prefill chunks and decode take the kernel, the
    # long ones the dequantize-then-GEMM path. Exact int8 maths differs from the
    # fp32 reference only in summation order, so every token must agree; a wrong
    # kernel (a bad scale, a misread block) cannot agree on 8 x 16 random-model tokens.
    vocab = 320
    prompts = [[(7 * i + 13 * j) % (vocab - 3) + 3 for j in range(n)]
               for i, n in enumerate([5, 9, 17, 33, 40, 70, 3, 12])]
    ref = LLMEngine(EngineConfig(model=str(_prerounded(tiny_llama, tmp_path / "pre")),
                                 dtype="float32", num_kv_blocks=128))
    q8 = LLMEngine(EngineConfig(model=str(tiny_llama), dtype="float32", num_kv_blocks=128,
                                quantization="int8"))
    assert isinstance(q8.model.layers[0].gate_up, Int8Linear)
    assert _greedy(q8, prompts, 16) == _greedy(ref, prompts, 16)


def test_quantization_is_validated_at_the_boundary() -> None:
    assert EngineConfig().quantization is None
    with pytest.raises(ValueError, match="quantization"):
        EngineConfig(quantization="int4")
    with pytest.raises(ValueError, match="quantization.*float16"):
        EngineConfig(dtype="float16", quantization="int8")


def test_a_model_that_cannot_be_quantized_is_a_value_error(tiny_llama: Path,
                                                           tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    shutil.copytree(tiny_llama, bad)
    f = next(bad.glob("*.safetensors"))
    tensors = load_file(f)
    tensors["model.layers.1.mlp.down_proj.weight"][3, 5] = float("inf")
    save_file(tensors, f)
    with pytest.raises(ValueError, match=r"quantization: model\.layers\.1\.mlp\.down_proj"):
        LLMEngine(EngineConfig(model=str(bad), dtype="float32", quantization="int8"))
    with pytest.raises(ValueError, match="quantization: int8 needs a non-empty 2-D weight"):
        quantize_int8(torch.ones(4), "norm.weight")


@pytest.mark.parametrize("role", ["prefill", "decode"])
def test_worker_argv_round_trips_quantization(role: str) -> None:
    config = parse_args(role, ["--quantization", "int8", "--dtype", "float32"])
    assert config.engine.quantization == "int8"
    assert parse_args(role, worker_argv(config)) == config
    with pytest.raises(ValueError, match="quantization"):
        parse_args(role, ["--quantization", "fp4"])


def test_cluster_yaml_quantization_reaches_every_worker(tmp_path: Path) -> None:
    from pdserve.cluster_config import ClusterConfig

    path = tmp_path / "cluster.yaml"
    path.write_text("launcher: process\nquantization: int8\n")
    c = ClusterConfig.from_yaml(path)
    assert [c.worker(role, m, 0, 1).engine.quantization for role, m in c.members()] == [
        "int8", "int8"]
    with pytest.raises(ValueError, match="quantization"):
        ClusterConfig(launcher="process", quantization="awq")


@needs_kernels
def test_auto_times_the_kernel_against_dequantize_and_gemm_once(tmp_path: Path) -> None:
    from pdserve.engine import kernel_choice

    _, w = _case(1, 24, 64)
    try:
        kernel_choice.use_cache(kernel_choice.ChoiceCache(tmp_path / "c.json"))
        lin = Int8Linear(w, None, torch.float32, kernels="auto")
        choice = kernel_choice.cache().get(
            f"linear_int8w_packed n=24 k=64 threads={torch.get_num_threads()}")
        assert choice in ("cpu", "torch")
        assert (lin._kernel is not None) == (choice == "cpu")
        assert Int8Linear(w, None, torch.float32, kernels="torch")._kernel is None
    finally:
        kernel_choice.use_cache(None)
