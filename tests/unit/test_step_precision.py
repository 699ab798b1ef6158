"""A CPU step's precision follows its rows (linear.py's plan): small steps compute in
fp32 through our kernels, wide ones, where bf16 is native, in bf16 end to end; the
KV pool is bf16 (kv_cache_dtype=auto with bf16 weights, or fp32 when asked) and both
kinds of step read and write it.

The native-bf16 plan is forced here so that it runs on any CPU (an AVX2 box emulates
the bf16 GEMM: slow, same numbers)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pdserve.config import EngineConfig
from pdserve.engine import linear
from pdserve.engine.engine import LLMEngine
from pdserve.engine.outputs import RequestOutput
from pdserve.sampling_params import SamplingParams
from tests.engine_helpers import assert_engine_empty, assert_follows_until_near_tie, generate_all

PROMPTS = [list(range(5, 45)), list(range(50, 53)), [7] * 20]  # 40 and 20 rows: wide


@pytest.fixture
def native_bf16(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(linear, "native_low_precision", lambda device: True)


def _engine(model: Path, kernels: str = "cpu", kv_cache_dtype: str = "auto") -> LLMEngine:
    # kernels=cpu: the plan's fixed crossover (auto measures it per machine, below).
    return LLMEngine(EngineConfig(model=str(model), dtype="bfloat16", num_kv_blocks=64,
                                  max_num_batched_tokens=64, kernels=kernels,
                                  kv_cache_dtype=kv_cache_dtype))


def _generate(engine: LLMEngine, logprobs: int | None = None) -> list[RequestOutput]:
    params = SamplingParams(temperature=0, max_tokens=12, min_tokens=12, logprobs=logprobs)
    return generate_all(engine, PROMPTS, params)


def test_wide_steps_run_bf16_and_small_steps_fp32(
        tiny_llama: Path, native_bf16: None, monkeypatch: pytest.MonkeyPatch) -> None:
    engine = _engine(tiny_llama)
    m = engine.model
    assert (m.dtype, m.gemm_dtype, m.small_batch) == (torch.float32, torch.bfloat16, 8)
    assert engine.kv.data.dtype == torch.bfloat16
    seen: list[tuple[int, torch.dtype]] = []  # (rows, activations' dtype) of every QKV call
    call = linear.Linear.__call__

    def recording(self: linear.Linear, x: torch.Tensor) -> torch.Tensor:
        if self is m.layers[0].qkv:
            seen.append((x.shape[0], x.dtype))
        return call(self, x)

    monkeypatch.setattr(linear.Linear, "__call__", recording)
    m.decode_kernel = None  # the per-op path, so every step passes the recorder
    _generate(engine)
    assert {dt for rows, dt in seen if rows > 8} == {torch.bfloat16}
    assert {dt for rows, dt in seen if rows <= 8} == {torch.float32}
    assert any(rows > 8 for rows, _ in seen) and any(rows <= 8 for rows, _ in seen)


def test_wide_bf16_steps_follow_the_all_fp32_tokens(tiny_llama: Path, native_bf16: None) -> None:
    """The same requests with every step in fp32: with the wide steps' bf16 GEMMs,
    their fp32 KV writes and the later steps' reads of them, each continuation stays
    on fp32's until a near tie (bf16 rounding differs by CPU, so a tie may flip)."""
    split = _generate(_engine(tiny_llama))
    engine = _engine(tiny_llama)
    engine.model.wide = lambda fb: False  # type: ignore[method-assign]
    assert_follows_until_near_tie(split, _generate(engine, logprobs=5))


def test_an_fp32_pool_and_a_bf16_pool_give_the_same_tokens_until_a_near_tie(
        tiny_llama: Path, native_bf16: None) -> None:
    fp32 = _engine(tiny_llama, kv_cache_dtype="float32")
    assert fp32.kv.data.dtype == torch.float32
    bf16 = _engine(tiny_llama)
    # Half the bytes a block takes: twice the blocks for the same kv_cache_gb.
    assert bf16.kv.data.element_size() * 2 == fp32.kv.data.element_size()
    assert_follows_until_near_tie(_generate(bf16), _generate(fp32, logprobs=5))
    assert_engine_empty(bf16)
    assert_engine_empty(fp32)


class _Timed:
    """A linear whose kernel beats the GEMM up to ``wins`` rows."""

    def __init__(self, wins: int) -> None:
        self.wins, self.asked = wins, []  # type: list[int]

    def faster_at(self, rows: int) -> bool:
        self.asked.append(rows)
        return rows <= self.wins


@pytest.mark.parametrize(("wins", "upper", "rows"), [(0, 8, 1), (3, 8, 2), (4, 8, 4),
                                                     (64, 8, 8), (64, 4, 4)])
def test_the_small_batch_is_the_measured_crossover(wins: int, upper: int, rows: int) -> None:
    timed = _Timed(wins)
    assert linear.measured_small_batch(timed, upper) == rows  # type: ignore[arg-type]
    assert max(timed.asked) <= upper


def test_auto_kernels_give_every_linear_the_models_small_batch(
        tiny_llama: Path, native_bf16: None) -> None:
    m = _engine(tiny_llama, kernels="auto").model
    assert 1 <= m.small_batch <= linear.SMALL_BATCH_NATIVE
    linears = [m.lm_head, *(getattr(w, n) for w in m.layers for n in ("qkv", "o", "gate_up", "down"))]
    assert {lin.small_batch for lin in linears} == {m.small_batch}
