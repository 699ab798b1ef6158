"""Kernels chosen by the machine: CPU features, per-ISA builds, self-check, auto choice."""

from __future__ import annotations

import logging
import random
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from pdserve.config import EngineConfig
from pdserve.engine import cpu_kernels, kernel_check, kernel_choice
from pdserve.engine.cpu_features import CpuFeatures, detect, isa_level, parse_cpuinfo
from pdserve.engine.engine import LLMEngine
from pdserve.sampling_params import SamplingParams
from tests.engine_helpers import assert_engine_empty, hf_greedy, run_all

_ZEN3 = ("fpu vme sse sse2 ssse3 fma cx16 sse4_1 sse4_2 avx f16c bmi1 avx2 bmi2 "
         "sha_ni vaes vpclmulqdq")  # AVX2 only, like this project's build box
_SAPPHIRE_RAPIDS = (_ZEN3 + " avx512f avx512dq avx512cd avx512bw avx512vl avx512_vnni "
                    "avx512_bf16 avx512_fp16 amx_bf16 amx_tile amx_int8")
_CASCADE_LAKE = _ZEN3 + " avx512f avx512dq avx512cd avx512bw avx512vl avx512_vnni"


def _cpuinfo(model: str, flags: str) -> str:
    # Two processors: the first one's lines are what counts.
    return "".join(f"processor\t: {i}\nvendor_id\t: X\nmodel name\t: {model}\n"
                   f"flags\t\t: {flags}\n\n" for i in range(2))


def test_features_of_an_avx2_only_cpu() -> None:
    f = parse_cpuinfo(_cpuinfo("AMD EPYC 7763 64-Core Processor", _ZEN3))
    assert f.model == "AMD EPYC 7763 64-Core Processor"
    assert f.avx2 and not f.avx512 and not f.avx512_bf16 and not f.amx
    level = f.best_level()
    assert level is not None and level.name == "avx2"
    assert "-mavx512f" not in level.cflags


def test_features_of_avx512_cpus() -> None:
    spr = parse_cpuinfo(_cpuinfo("Intel(R) Xeon(R) Platinum 8480+", _SAPPHIRE_RAPIDS))
    assert spr.avx512 and spr.avx512_bf16 and spr.avx512_vnni and spr.amx
    level = spr.best_level()
    assert level is not None and level.name == "avx512bf16"
    assert {"-mavx512bf16", "-mavx512vnni", "-mavx2"} <= set(level.cflags)
    clx = parse_cpuinfo(_cpuinfo("Intel(R) Xeon(R) Gold 6248", _CASCADE_LAKE)).best_level()
    assert clx is not None and clx.name == "avx512" and "-mavx512bf16" not in clx.cflags
    assert parse_cpuinfo(_cpuinfo("old", "fpu sse sse2 avx")).best_level() is None
    assert spr.key() != parse_cpuinfo(_cpuinfo("Intel(R) Xeon(R) Platinum 8480+", _ZEN3)).key()


def test_build_directory_is_keyed_by_isa_level() -> None:
    avx2, bf16 = cpu_kernels.build_key(isa_level("avx2")), cpu_kernels.build_key(
        isa_level("avx512bf16"))
    assert avx2 != bf16 and "-avx2-" in avx2 and "-avx512bf16-" in bf16
    assert avx2.split("-")[-1] == bf16.split("-")[-1]  # same sources' digest
    assert torch.__version__ in avx2


def test_a_module_recorded_for_a_higher_isa_is_never_imported(tmp_path: Path) -> None:
    (tmp_path / "pdserve_cpu_kernels.so").write_bytes(b"not a module: importing it would fail")
    (tmp_path / "isa").write_text("avx512bf16")
    avx2_cpu = parse_cpuinfo(_cpuinfo("AMD EPYC", _ZEN3))
    with pytest.raises(cpu_kernels.IsaMismatch, match="avx512bf16"):
        cpu_kernels.import_built(tmp_path, avx2_cpu)
    (tmp_path / "isa").unlink()  # no record: refused as well
    with pytest.raises(cpu_kernels.IsaMismatch):
        cpu_kernels.import_built(tmp_path, avx2_cpu)
    # A CPU that has the recorded level does try the import (and this file fails it).
    (tmp_path / "isa").write_text("avx2")
    with pytest.raises(ImportError) as err:
        cpu_kernels.import_built(tmp_path, avx2_cpu)
    assert not isinstance(err.value, cpu_kernels.IsaMismatch)


def test_without_a_compiler_a_lower_level_build_of_the_same_sources_is_used(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # An image baked on an AVX2 machine, run on an AVX-512 BF16 one with no compiler.
    monkeypatch.setenv("PDSERVE_CACHE", str(tmp_path))
    baked = tmp_path / "ext" / cpu_kernels.build_key(isa_level("avx2"))
    baked.mkdir(parents=True)
    (baked / "pdserve_cpu_kernels.so").write_bytes(b"")
    (baked / "isa").write_text("avx2")
    spr = parse_cpuinfo(_cpuinfo("Intel(R) Xeon(R) Platinum 8480+", _SAPPHIRE_RAPIDS))
    imported: list[Path] = []
    monkeypatch.setattr(cpu_kernels, "detect", lambda: spr)
    monkeypatch.setattr(cpu_kernels, "_load_for", _no_compiler)
    monkeypatch.setattr(cpu_kernels, "_import", lambda path: imported.append(path) or "avx2 module")
    for name, value in (("_tried", False), ("_module", None), ("_module_dir", None)):
        monkeypatch.setattr(cpu_kernels, name, value)
    assert cpu_kernels.load() == "avx2 module"
    assert imported == [baked / "pdserve_cpu_kernels.so"]
    assert cpu_kernels.loaded_build_dir() == baked  # auto choices are cached next to it


def _no_compiler(*args: Any) -> Any:
    raise RuntimeError("no C++ compiler")


def test_this_machine_runs_the_module_built_for_its_own_level() -> None:
    module, level = cpu_kernels.load(), detect().best_level()
    if module is None or level is None:
        pytest.skip("CPU kernels unavailable here")
    assert module.compiled_isa() == level.name  # the parity tests ran this ISA's paths
    checked = kernel_check.verified()
    assert checked is not None and checked.ok == frozenset(kernel_check.KERNEL_NAMES)


class _Broken:
    """The real module with silu_mul wrong and paged_decode_attention raising."""

    def __init__(self, real: Any) -> None:
        self._real = real

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        return self._real.silu_mul(gate_up) * 1.01

    def paged_decode_attention(self, *args: Any) -> torch.Tensor:
        raise RuntimeError("illegal instruction (simulated)")


@pytest.fixture
def broken_kernels(monkeypatch: pytest.MonkeyPatch) -> Any:
    real = cpu_kernels.load()
    if real is None:
        pytest.skip("CPU kernels unavailable here")
    monkeypatch.setattr(cpu_kernels, "load", lambda: _Broken(real))
    kernel_check.forget()
    yield
    kernel_check.forget()


def test_self_check_drops_a_wrong_kernel_with_one_log_line(
        broken_kernels: Any, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="pdserve.engine.kernel_check"):
        checked = kernel_check.verified()
        assert kernel_check.verified() is checked  # checked once per process
    assert checked is not None
    assert checked.ok == frozenset(kernel_check.KERNEL_NAMES) - {"silu_mul",
                                                                  "paged_decode_attention"}
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2  # one line per dropped kernel, naming it
    assert "paged_decode_attention" in lines[0] and "silu_mul" in lines[1]


def test_engine_with_a_dropped_kernel_still_produces_the_reference_tokens(
        broken_kernels: Any, tiny_llama: Path) -> None:
    engine = LLMEngine(EngineConfig(model=str(tiny_llama), dtype="float32", kernels="cpu",
                                    num_kv_blocks=64))
    ops = engine.model.ops
    assert ops.use == frozenset({"rms_norm", "rope_store_kv"})  # type: ignore[attr-defined]
    rng = random.Random(0)
    prompts = [[rng.randrange(3, engine.spec.vocab_size) for _ in range(n)] for n in (3, 20)]
    params = SamplingParams(temperature=0, max_tokens=8, min_tokens=8)
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, params)
    done = run_all(engine)
    ours = [done[str(i)].token_ids for i in range(len(prompts))]  # type: ignore[attr-defined]
    assert ours == hf_greedy(tiny_llama, prompts, 8)
    assert_engine_empty(engine)


def test_auto_choice_is_cached_and_read_back_without_timing(tmp_path: Path) -> None:
    path = tmp_path / "choices.json"
    calls = SimpleNamespace(ours=0, torch=0)

    def ours() -> None:
        calls.ours += 1

    def slow_torch() -> None:
        calls.torch += 1
        sum(range(20000))

    try:
        kernel_choice.use_cache(kernel_choice.ChoiceCache(path))
        assert kernel_choice.prefer_ours("silu_mul i=64", [ours, ours], [slow_torch])
        assert calls.ours > 0 and calls.torch > 0
        assert "silu_mul i=64" in path.read_text()

        def untimed() -> None:
            raise AssertionError("timed again")

        kernel_choice.use_cache(kernel_choice.ChoiceCache(path))  # a later process
        assert kernel_choice.prefer_ours("silu_mul i=64", [untimed], [untimed])
    finally:
        kernel_choice.use_cache(None)


def test_auto_picks_per_op_among_the_checked_kernels(tmp_path: Path) -> None:
    from pdserve.engine.layer_ops import CpuKernelOps, layer_ops
    from pdserve.engine.rope import RotaryEmbedding

    if kernel_check.verified() is None:
        pytest.skip("CPU kernels unavailable here")
    config = SimpleNamespace(rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    rope = RotaryEmbedding(config, 16, 512, torch.float32, torch.device("cpu"))
    try:
        kernel_choice.use_cache(kernel_choice.ChoiceCache(tmp_path / "c.json"))
        ops = layer_ops("auto", rope, 4, 2, torch.float32, torch.device("cpu"), 64, 96)
        assert isinstance(ops, CpuKernelOps)
        choices = kernel_choice.cache()
        for kernel in ("rms_norm", "rope_store_kv", "paged_decode_attention", "silu_mul"):
            key = [k for k in choices._choices if k.startswith(kernel + " ")]
            assert len(key) == 1
            assert (kernel in ops.use) == (choices.get(key[0]) == "cpu")
    finally:
        kernel_choice.use_cache(None)


def test_torch_features_fallback_has_a_level_where_torch_sees_avx2() -> None:
    from pdserve.engine.cpu_features import _from_torch

    f = _from_torch()
    assert isinstance(f, CpuFeatures)
    assert (f.best_level() is not None) == bool(torch.cpu._is_avx2_supported())


@pytest.mark.parametrize("pool_dtype", [torch.float32, torch.bfloat16])
def test_decode_attention_of_rows_sharing_a_table_equals_each_row_alone(
        pool_dtype: torch.dtype) -> None:
    """A request's token and its drafts (consecutive rows, one block table, lengths one
    apart) read their keys together: each row's output must be exactly its output alone,
    so speculative decoding gives the plain run's tokens."""
    m = cpu_kernels.load()
    if m is None:
        pytest.skip("no compiled kernels on this machine (torch fallback)")
    g = torch.Generator().manual_seed(0)
    bs, kvh, hd, heads = 16, 3, 64, 9
    kc = torch.randn(8, bs, kvh, hd, generator=g).to(pool_dtype)
    vc = torch.randn(8, bs, kvh, hd, generator=g).to(pool_dtype)
    tables = torch.tensor([[3, 1, 6, 0]] * 5 + [[2, 5, 7, 4]] + [[3, 1, 6, 0]] * 2)
    lens = torch.tensor([40, 41, 42, 43, 44, 57, 9, 10])  # a 5-row group, 1 row, 2 rows
    q = torch.randn(8, heads, hd, generator=g)
    together = m.paged_decode_attention(q, kc, vc, tables, lens, 0.125)
    alone = torch.cat([m.paged_decode_attention(q[i:i + 1], kc, vc, tables[i:i + 1],
                                                lens[i:i + 1], 0.125) for i in range(8)])
    assert torch.equal(together, alone)
    ref = torch.cat([_attention_reference(q[i], kc, vc, tables[i], int(lens[i]))
                     for i in range(8)])
    torch.testing.assert_close(together, ref, rtol=1e-4, atol=1e-4)


def _attention_reference(q: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor,
                         table: torch.Tensor, n: int) -> torch.Tensor:
    """(1, heads, hd): q (heads, hd) over the first n keys of its block table."""
    k = kc[table].flatten(0, 1)[:n].float()  # (n, kvh, hd)
    v = vc[table].flatten(0, 1)[:n].float()
    group = q.shape[0] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    p = torch.softmax(torch.einsum("hd,nhd->hn", q, k) * 0.125, dim=-1)
    return torch.einsum("hn,nhd->hd", p, v)[None]
