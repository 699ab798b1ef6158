"""`pdserve bench --target` arithmetic: vLLM-style TTFT/TPOT/ITL/goodput on hand-made
timings, the Poisson schedule of W4, and the open loop sending on time."""

from __future__ import annotations

import asyncio
import statistics
from collections.abc import AsyncIterator

import pytest

from bench.serving_bench import (
    closed_specs,
    long_rate_for,
    poisson_times,
    run_open_loop,
    w4_schedule,
)
from bench.serving_client import Chunk, RequestSpec, measure
from bench.stats import SLO, RequestRecord, median_of, summarize, tpot
from bench.workloads import runs_for


def _records() -> list[RequestRecord]:
    a = RequestRecord("a", "x", 8, 3, start_s=0.0, ttft_s=0.1, e2e_s=0.6,
                      chunk_times_s=[0.1, 0.3, 0.6], output_tokens=3, success=True)
    b = RequestRecord("b", "x", 8, 2, start_s=1.0, ttft_s=0.2, e2e_s=0.3,
                      chunk_times_s=[1.2, 1.3], output_tokens=2, success=True)
    c = RequestRecord("c", "x", 8, 1, start_s=1.0, ttft_s=0.5, e2e_s=0.5,
                      chunk_times_s=[1.5], output_tokens=1, success=True)
    d = RequestRecord("d", "x", 8, 3, start_s=1.5, error="boom")
    return [a, b, c, d]


def test_summary_matches_hand_computed_vllm_definitions() -> None:
    recs = _records()
    assert tpot(recs[0]) == pytest.approx(0.25)  # (0.6 - 0.1) / (3 - 1)
    assert tpot(recs[2]) is None  # one output token: no TPOT
    s = summarize(recs, duration_s=2.0)
    assert (s["completed"], s["failed"], s["output_tokens"]) == (3, 1, 6)
    assert s["request_throughput"] == pytest.approx(1.5)
    assert s["output_throughput"] == pytest.approx(3.0)
    # ITL pooled over requests: [0.2, 0.3] + [0.1]; linear interpolation like numpy/vLLM
    assert s["itl_ms"]["p50"] == pytest.approx(200.0)
    assert s["itl_ms"]["p90"] == pytest.approx(280.0)
    assert s["itl_ms"]["p99"] == pytest.approx(298.0)
    assert s["itl_ms"]["max"] == pytest.approx(300.0)  # the worst stall, which p99 can hide
    assert s["ttft_ms"]["mean"] == pytest.approx(1e3 * 0.8 / 3)
    assert s["ttft_ms"]["p50"] == pytest.approx(200.0)
    assert s["tpot_ms"]["p50"] == pytest.approx(175.0)
    assert s["decode_tok_s"] == pytest.approx(1 / 0.175)
    assert s["e2e_ms"]["p50"] == pytest.approx(500.0)
    assert s["goodput"] is None


def test_goodput_counts_requests_meeting_every_slo() -> None:
    recs = _records()
    # a: TPOT 0.25 too slow; b: good; c: TTFT 0.5 too slow; d failed
    assert summarize(recs, 2.0, SLO(ttft_s=0.3, tpot_s=0.2))["goodput"] == pytest.approx(0.5)
    # TPOT only: a, b good and c (one token counts as TPOT 0, as in vLLM)
    assert summarize(recs, 2.0, SLO(tpot_s=0.3))["goodput"] == pytest.approx(1.5)


def test_median_of_repeats_is_element_wise() -> None:
    runs = [{"x": 1.0, "d": {"p50": 3.0}, "n": None}, {"x": 5.0, "d": {"p50": 1.0}, "n": 2.0},
            {"x": 2.0, "d": {"p50": 2.0}, "n": 4.0}]
    assert median_of(runs) == {"x": 2.0, "d": {"p50": 2.0}, "n": 3.0}


def test_poisson_schedule_is_reproducible_with_the_right_rate() -> None:
    times = poisson_times(5.0, 2000.0, seed=1)
    assert times == poisson_times(5.0, 2000.0, seed=1)
    assert times != poisson_times(5.0, 2000.0, seed=2)
    assert len(times) / 2000.0 == pytest.approx(5.0, rel=0.03)
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    assert statistics.fmean(gaps) == pytest.approx(0.2, rel=0.03)
    assert statistics.stdev(gaps) == pytest.approx(0.2, rel=0.05)  # exponential: sd = mean
    assert poisson_times(0.0, 10.0, seed=1) == []


def test_w4_schedule_mixes_two_classes_in_time_order() -> None:
    sched = w4_schedule(2.0, 0.5, 200.0, vocab=100, seed=0)
    assert sched == w4_schedule(2.0, 0.5, 200.0, vocab=100, seed=0)
    assert [a.at_s for a in sched] == sorted(a.at_s for a in sched)
    short = [a.spec for a in sched if a.spec.cls == "short"]
    long = [a.spec for a in sched if a.spec.cls == "long"]
    assert len(short) / 200 == pytest.approx(2.0, rel=0.15)
    assert len(long) / 200 == pytest.approx(0.5, rel=0.3)
    assert {(len(s.prompt), s.max_tokens) for s in short} == {(128, 128)}
    assert {(len(s.prompt), s.max_tokens) for s in long} == {(2048, 4)}
    assert len({s.rid for s in short + long}) == len(sched)
    # 40 % of a 5,120 tok/s core = 2,048 tok/s of long prompts = 1 long request per second
    assert long_rate_for(5120.0, 0.4) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="long-share"):
        long_rate_for(5120.0, 1.5)


def test_served_w1_w3_prompts_are_the_offline_ones() -> None:
    for w in ("W1", "W2", "W3"):
        run = runs_for(w, 100)[0]
        specs = closed_specs(w, 100)
        assert [s.prompt for s in specs] == run.prompts
        assert {s.max_tokens for s in specs} == {run.max_tokens}


class _SlowBackend:
    """Every request streams 2 tokens in one chunk after 0.3 s."""

    target = "fake://slow"

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def stream(self, spec: RequestSpec) -> AsyncIterator[Chunk]:
        await asyncio.sleep(0.3)
        yield Chunk(True, tokens=2)
        yield Chunk(False, usage=2)


def test_open_loop_sends_on_schedule_without_waiting_for_completions() -> None:
    sched = w4_schedule(20.0, 0.0, 0.5, vocab=100, seed=3)
    assert len(sched) >= 4
    records, duration = asyncio.run(run_open_loop(_SlowBackend(), sched))
    for a, r in zip(sched, sorted(records, key=lambda r: r.start_s), strict=True):
        assert a.at_s - 0.001 <= r.start_s < a.at_s + 0.1  # sent at its time, not after the last
    assert all(r.success and r.output_tokens == 2 and r.itl_s == [] for r in records)
    assert duration < sched[-1].at_s + 0.3 + 0.5


def test_measure_records_errors_instead_of_raising() -> None:
    class Broken(_SlowBackend):
        async def stream(self, spec: RequestSpec) -> AsyncIterator[Chunk]:
            yield Chunk(True, tokens=1)
            raise ConnectionError("reset")

    rec = asyncio.run(measure(Broken(), RequestSpec("r", "x", [1], 4), 0.0))
    assert not rec.success and "reset" in rec.error
