"""`pdserve bench --engine` end to end on a tiny model, and the figure arithmetic."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.workloads import figures, runs_for
from pdserve.cli import main


def test_figures_follow_the_workload_definitions() -> None:
    assert figures("W1", {"W1": [2.0, 4.0, 3.0]})["output_tok_s"] == pytest.approx(4096 / 3.0)
    w2 = figures("W2", {"W2": [2.65], "W2-ttft": [0.1]})
    assert w2["decode_tok_s"] == pytest.approx(100.0) and w2["ttft_ms"] == pytest.approx(100.0)
    assert figures("W3", {"W3": [2.048]})["prefill_tok_s"] == pytest.approx(1000.0)
    w1 = runs_for("W1", vocab=100)
    assert len(w1[0].prompts) == 32 and {len(p) for p in w1[0].prompts} == {256}
    assert runs_for("W1", vocab=100) == w1  # fixed seed: same prompts for every engine
    with pytest.raises(ValueError, match="W1, W2, W3"):
        runs_for("W9", vocab=100)


def test_bench_engine_writes_json(tiny_llama: Path, tmp_path: Path,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "bench.json"
    rc = main(["bench", "--engine", "--workload", "W2", "--repeats", "1", "--threads", "1",
               "--model", str(tiny_llama), "--dtype", "float32", "--json", str(out)])
    assert rc == 0
    doc = json.loads(out.read_text())
    report = doc["report"]
    assert report["W2"]["pdserve"]["decode_tok_s"] > 0
    printed = capsys.readouterr().out
    assert "W2 decode_tok_s: pdserve" in printed
    # the machine and the ceilings measured in this run are named in the table and the JSON
    assert doc["machine"]["threads"] == 1 and "avx512_bf16" in doc["machine"]["flags"]
    assert doc["ceilings"]["read_GBps"] > 0 and "float32" in doc["ceilings"]["gemm_GFLOPs"]
    assert report["W2"]["ceiling"] == doc["ceilings"]["workloads"]["W2"]["decode_tok_s"]
    assert "machine: " in printed and "ceilings (measured now, 1 threads, best of 2" in printed


def test_bench_engine_w6_compares_plain_and_speculative_decoding(
        tiny_llama: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    # The tiny model's vocabulary has no words: W6's prompts become repeating token runs.
    from bench import spec_bench

    monkeypatch.setattr(spec_bench, "load_tokenizer", lambda model: None)
    monkeypatch.setattr(spec_bench, "grounded_prompts",
                        lambda tok: [list(range(5 + i, 25 + i)) * 3 for i in range(4)])
    monkeypatch.setattr(spec_bench, "chat_prompts",
                        lambda tok: [list(range(50 + 7 * i, 90 + 7 * i)) for i in range(4)])
    monkeypatch.setattr(spec_bench, "OUTPUT_TOKENS", 40)
    out = tmp_path / "w6.json"
    spec = '{"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1}'
    rc = main(["bench", "--engine", "--workload", "W6", "--repeats", "1", "--threads", "1",
               "--model", str(tiny_llama), "--dtype", "float32", "--speculative-config", spec,
               "--json", str(out)])
    assert rc == 0
    res = json.loads(out.read_text())["W6_speculative"]
    assert res["speculative_config"]["num_speculative_tokens"] == 3
    for name in ("W6", "W6 x1", "chat"):  # fp32: the engine is batch-invariant
        r = res[name]
        assert r["identical"] == r["requests"] and r["speedup"] > 0
        assert r["spec"]["drafts"]["draft_tokens"] >= r["spec"]["drafts"]["accepted_tokens"]
        assert r["plain"]["drafts"]["drafts"] == 0
    assert "W6 x1: decode" in capsys.readouterr().out
    assert main(["bench", "--engine", "--workload", "W6", "--workload", "W1"]) == 2
    assert "W6 alone" in capsys.readouterr().err
