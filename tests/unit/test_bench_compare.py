"""`pdserve bench --compare A.json B.json` on two small runs of each JSON shape."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.compare import EXTRACT, Figure, load, ratio_range, rows
from pdserve.cli import main

FIXTURES = Path(__file__).parent / "fixtures"
ENGINE_A, ENGINE_B = str(FIXTURES / "bench_engine_a.json"), str(FIXTURES / "bench_engine_b.json")
SERVED_A, SERVED_B = str(FIXTURES / "bench_served_a.json"), str(FIXTURES / "bench_served_b.json")


def _line(out: str, start: str) -> str:
    return next(ln for ln in out.splitlines() if ln.strip().startswith(start))


def test_engine_figures_per_repeat_come_from_the_raw_times() -> None:
    figs = EXTRACT["engine"](load(ENGINE_A))
    w3 = figs["pdserve"]["W3 prefill_tok_s"]
    assert w3.value == 1000.0
    assert w3.repeats == pytest.approx((1024.0, 1000.0, 2048 / 2.2))
    assert w3.spread == pytest.approx((2048 / 2.2, 1024.0))


def test_engine_compare_shows_b_over_a_with_the_spread(
        capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "--compare", ENGINE_A, ENGINE_B]) == 0
    out = capsys.readouterr().out
    assert "machine A: Test CPU [+avx2 -avx512f] 2 of 2 cpus, torch 2.13.0" in out
    line = _line(out, "W3 prefill_tok_s")
    # A 1000 [931-1024], B 2000 [1862-2048]: B/A 2.0, at least 1862/1024, at most 2048/931
    assert "1000 [930.9-1024] n=3" in line and "2000 [1862-2048] n=3" in line
    assert line.endswith("2.000 [1.818-2.200] *")
    assert "vllm" not in out  # only in A: nothing to compare it with


def test_served_compare_pairs_single_targets_and_marks_only_real_changes(
        capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "--compare", SERVED_A, SERVED_B]) == 0
    out = capsys.readouterr().out
    assert "before -> after" in out
    same = _line(out, "W2 decode_tok_s")  # A 10-12, B 11-11: within the scatter
    assert same.endswith("1.000 [0.917-1.100]")
    faster = _line(out, "W2 ttft_p50_ms")  # A 90-110, B 45-55: beyond it
    assert faster.endswith("0.500 [0.409-0.611] *")
    w4 = _line(out, "W4 short itl_p99_ms")  # one run: no spread, no mark
    assert "400 n=1" in w4 and w4.endswith("0.250")
    assert _line(out, "W4 all req_s").endswith("1.000")


def test_ratio_range_and_zero_baselines() -> None:
    a, b = Figure(2.0, (1.0, 2.0, 4.0)), Figure(4.0, (4.0, 8.0))
    assert ratio_range(a, b) == (1.0, 8.0)
    assert rows({"x": Figure(0.0, (0.0,))}, {"x": Figure(1.0, (1.0,))})[0][3] == "n/a"


def test_mismatched_or_unreadable_runs_fail_with_a_clear_error(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "--compare", ENGINE_A, SERVED_B]) == 2
    assert "different pdserve bench modes" in capsys.readouterr().err
    assert main(["bench", "--compare", ENGINE_A, str(tmp_path / "missing.json")]) == 2
    assert "cannot read" in capsys.readouterr().err
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"prompts": []}))
    assert main(["bench", "--compare", str(other), ENGINE_B]) == 2
    assert "is not the JSON of pdserve bench" in capsys.readouterr().err
