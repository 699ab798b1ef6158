"""This machine's rates, measured now, on the threads the benchmark uses.

Two rates bound every engine figure: memory read bandwidth (a decode step reads
every weight and the KV of its context) and GEMM throughput (prefill). Each is
the max over several ways of doing the same thing, each way timed by the same
best-of-N loop (``best_seconds``), so a ceiling is never below what a plain torch
op reaches in the same process. GEMMs run in every dtype the engine could compute
in; which of them bound a given engine is ``bench/roofline.py``'s business.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F

Shape = tuple[int, int, int]  # (M, K, N) of an (M, K) x (K, N) GEMM
READ_BYTES = 256 * 2**20  # far above any L3, so reads come from DRAM
ROUNDS = 5
BUDGET_S = 0.25
MIN_SAMPLE_S = 0.001  # a timed sample repeats the op until it lasts this long


@dataclass(frozen=True)
class Rates:
    threads: int
    read_GBps: float  # the max of read_by_method
    read_by_method: dict[str, float]
    gemm_GFLOPs: dict[str, float]  # dtype name -> max over shapes and layouts


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def best_seconds(fn: Callable[[], object], rounds: int = ROUNDS,
                 budget_s: float = BUDGET_S) -> float:
    """Seconds of one call of ``fn``: the best sample after a warm-up, sampling at least
    ``rounds`` times and for at least ``budget_s``. On a shared machine the best of many
    short samples is the one no other process interrupted."""
    t0 = time.perf_counter()
    fn()  # warm-up: first-touch pages, oneDNN primitive creation
    repeat = max(1, int(MIN_SAMPLE_S / max(time.perf_counter() - t0, 1e-9)))
    best, samples, start = float("inf"), 0, time.perf_counter()
    while samples < rounds or time.perf_counter() - start < budget_s:
        t0 = time.perf_counter()
        for _ in range(repeat):
            fn()
        best = min(best, (time.perf_counter() - t0) / repeat)
        samples += 1
    return best


def read_gbps(nbytes: int = READ_BYTES, rounds: int = ROUNDS) -> dict[str, float]:
    """GB/s of reading ``nbytes`` three ways: a sum, a copy (read + write counted)
    and a matrix-vector product (how a batch-1 decode step reads a weight)."""
    n = nbytes // 4
    x = torch.rand(n)
    dst = torch.empty_like(x)
    w = x.view(-1, 1024)  # (n/1024, 1024) fp32 "weight"
    v = torch.rand(1, 1024)
    ways: dict[str, tuple[Callable[[], object], int]] = {
        "sum": (x.sum, nbytes),
        "copy": (lambda: dst.copy_(x), 2 * nbytes),
        "gemv": (lambda: F.linear(v, w), nbytes),
    }
    return {name: work / best_seconds(fn, rounds) / 1e9 for name, (fn, work) in ways.items()}


def gemm_gflops(dtype: str, shapes: Sequence[Shape], rounds: int = ROUNDS) -> float:
    """Best GFLOP/s of (M, K) x (K, N) over ``shapes`` and both weight layouts."""
    best = 0.0
    for m, k, n in shapes:
        for fn in _gemm_ways(dtype, m, k, n):
            best = max(best, 2 * m * k * n / best_seconds(fn, rounds) / 1e9)
    return best


def _gemm_ways(dtype: str, m: int, k: int, n: int) -> list[Callable[[], object]]:
    if dtype == "int8":  # int8 x int8 -> int32, what int8 weights could use at best
        a8 = torch.randint(-64, 64, (m, k), dtype=torch.int8)
        b8 = torch.randint(-64, 64, (k, n), dtype=torch.int8)
        return [lambda: torch._int_mm(a8, b8)]
    dt = getattr(torch, dtype)
    a, w = torch.randn(m, k).to(dt), torch.randn(n, k).to(dt)
    wt = w.t().contiguous()
    # x·wᵀ on an (N, K) weight is what the engine calls; x·w on (K, N) may pack differently.
    return [lambda: F.linear(a, w), lambda: torch.matmul(a, wt)]


def measure(threads: int, gemm_shapes: dict[str, Sequence[Shape]],
            read_bytes: int = READ_BYTES, rounds: int = ROUNDS) -> Rates:
    """Read bandwidth and, per dtype in ``gemm_shapes``, GEMM GFLOP/s on ``threads``."""
    with torch_threads(threads):
        by_method = read_gbps(read_bytes, rounds)
        gemm = {dt: gemm_gflops(dt, shapes, rounds) for dt, shapes in gemm_shapes.items()}
    return Rates(threads=threads, read_GBps=max(by_method.values()),
                 read_by_method=by_method, gemm_GFLOPs=gemm)


def best_of(measured: Sequence[Rates]) -> Rates:
    """Each rate's best over several measurements (before and after a run: on a shared
    machine one window can be a busy one, and a ceiling must not be low)."""
    reads = {k: max(r.read_by_method[k] for r in measured) for k in measured[0].read_by_method}
    gemm = {k: max(r.gemm_GFLOPs[k] for r in measured) for k in measured[0].gemm_GFLOPs}
    return Rates(threads=measured[0].threads, read_GBps=max(reads.values()),
                 read_by_method=reads, gemm_GFLOPs=gemm)
