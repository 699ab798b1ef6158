"""The ceilings of `pdserve bench --engine`: never below a plain torch op measured the
same way in the same process, bytes counted from what the engine stores, the machine named."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from bench.ceilings import Rates, best_of, best_seconds, measure, torch_threads
from bench.machine import FLAGS, describe, line
from bench.roofline import EngineCosts, read_bytes, stored_tensors, workload_ceilings
from bench.workloads import runs_for
from pdserve import LLM
from pdserve.engine.linear import compute_dtype_for

SHAPE = (128, 64, 256)  # (M, K, N): small, so the test is quick
READ_BYTES = 8 * 2**20
THREADS = 1
ALTERNATIONS = 4
# Two best-of-N measurements of one op, interleaved, usually agree within a few %, but a
# cache-resident read once came out 10% apart on a quiet box; the bug this catches (a
# ceiling measured on a slower path: fp32 GEMM for a bf16 engine, a strided read) costs 2x.
NOISE = 0.7


def _linears(llm: LLM) -> list[object]:
    model = llm.engine.model
    return [*(lin for layer in model.layers for lin in (layer.qkv, layer.o, layer.gate_up,
                                                         layer.down)), model.lm_head]


@pytest.fixture(scope="module")
def engines(tiny_llama: Path) -> dict[str, LLM]:
    return {dt: LLM(model=str(tiny_llama), dtype=dt, num_threads=THREADS, num_kv_blocks=8)
            for dt in ("float32", "bfloat16")}


def _interleaved(plain: Callable[[], float], ceiling: Callable[[], float]) -> tuple[float, float]:
    """Best of each over alternating measurements: other processes' load on a shared
    machine comes and goes over seconds, so both must see the same quiet moments."""
    best_plain = best_ceiling = 0.0
    with torch_threads(THREADS):
        for _ in range(ALTERNATIONS):
            best_plain = max(best_plain, plain())
            best_ceiling = max(best_ceiling, ceiling())
    return best_plain, best_ceiling


def test_gemm_ceiling_is_not_below_a_plain_matmul_in_the_engine_compute_dtype() -> None:
    compute = compute_dtype_for(torch.bfloat16, torch.device("cpu"))
    name = str(compute).removeprefix("torch.")
    m, k, n = SHAPE
    a, w = torch.randn(m, k).to(compute), torch.randn(n, k).to(compute)
    plain, ceiling = _interleaved(
        lambda: 2 * m * k * n / best_seconds(lambda: F.linear(a, w)) / 1e9,
        lambda: measure(THREADS, {name: [SHAPE]}, read_bytes=2**20).gemm_GFLOPs[name])
    assert ceiling >= NOISE * plain


def test_read_ceiling_is_not_below_a_plain_sum() -> None:
    x = torch.rand(READ_BYTES // 4)
    assert set(measure(THREADS, {}, read_bytes=2**20).read_by_method) == {"sum", "copy", "gemv"}
    plain, ceiling = _interleaved(lambda: READ_BYTES / best_seconds(x.sum) / 1e9,
                                  lambda: measure(THREADS, {}, read_bytes=READ_BYTES).read_GBps)
    assert ceiling >= NOISE * plain


def test_decode_step_bytes_are_the_stored_weights_plus_the_context_kv(
        engines: dict[str, LLM]) -> None:
    fp32 = EngineCosts(engines["float32"].engine)
    stored = sum(lin.weight.nbytes for lin in _linears(engines["float32"]))  # type: ignore[attr-defined]
    spec = engines["float32"].engine.spec
    kv_per_token = spec.num_layers * 2 * spec.num_kv_heads * spec.head_dim * 4
    assert fp32.kv_bytes_per_token == kv_per_token
    assert fp32.decode_step([0])[1] == stored
    assert fp32.decode_step([10, 20])[1] == stored + 30 * kv_per_token

    bf16 = engines["bfloat16"]
    read = [t for lin in _linears(bf16) for t in stored_tensors(lin, rows=1)]
    assert {t.dtype for t in read} == {torch.bfloat16}  # packed or native: 2 bytes a weight
    bf16_bytes = EngineCosts(bf16.engine).decode_step([0])[1]
    assert bf16_bytes == sum(t.nbytes for t in read)
    assert stored / 2 <= bf16_bytes < 0.6 * stored  # packing pads a few rows, no more


def test_an_int8_linear_counts_its_qweight_and_scales() -> None:
    lin = SimpleNamespace(qweight=torch.zeros(48, 64, dtype=torch.int8),
                          scales=torch.ones(48), bias=None)
    assert read_bytes(lin, rows=1) == 48 * 64 + 48 * 4
    assert read_bytes(lin, rows=512) == 48 * 64 + 48 * 4


def test_workload_ceilings_are_bounded_by_the_rates(engines: dict[str, LLM]) -> None:
    costs = EngineCosts(engines["float32"].engine)
    rates = Rates(threads=1, read_GBps=10.0, read_by_method={"sum": 10.0},
                  gemm_GFLOPs={"float32": 100.0})
    runs = {r.name: r for w in ("W1", "W2", "W3") for r in runs_for(w, vocab=100)}
    c = workload_ceilings(costs, rates, runs)
    weights = costs.weight_bytes(1, 1)
    assert c["W2"]["decode_tok_s"] < 10e9 / weights  # the context's KV costs on top
    assert c["W2"]["bytes_per_step_first"] == weights + 257 * costs.kv_bytes_per_token
    assert c["W3"]["prefill_tok_s"] < 100e9 / costs.flops_per_token  # attention costs on top
    assert c["W1"]["output_tok_s"] > 0


def test_the_machine_is_named() -> None:
    m = describe(threads=3)
    assert m["cpu_model"] and m["cpus"] >= 1 and m["threads"] == 3
    assert m["torch"] == torch.__version__
    assert set(m["flags"]) == set(FLAGS) and all(isinstance(v, bool) for v in m["flags"].values())
    text = line(m)
    assert m["cpu_model"] in text and "avx512_bf16" in text and torch.__version__ in text


def test_the_best_of_measurements_takes_each_rate_at_its_best() -> None:
    before = Rates(threads=2, read_GBps=5.0, read_by_method={"sum": 5.0, "copy": 2.0},
                   gemm_GFLOPs={"float32": 10.0})
    after = Rates(threads=2, read_GBps=4.0, read_by_method={"sum": 1.0, "copy": 4.0},
                  gemm_GFLOPs={"float32": 20.0})
    best = best_of([before, after])
    assert best.read_by_method == {"sum": 5.0, "copy": 4.0} and best.read_GBps == 5.0
    assert best.gemm_GFLOPs == {"float32": 20.0} and best.threads == 2
