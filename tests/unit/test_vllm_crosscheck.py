"""The cross-check replays vLLM's schedule and applies the tolerance to the medians."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.vllm_crosscheck import compare, dataset_schedule, replay_schedule, spread


class WordTokenizer:
    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [len(w) for w in text.split()]


def test_replay_keeps_vllm_order_offsets_and_lengths(tmp_path: Path) -> None:
    data = tmp_path / "mix.jsonl"
    rows = [{"prompt": "a " * 128, "output_tokens": 128},
            {"prompt": "b " * 2048, "output_tokens": 4},
            {"prompt": "c " * 128, "output_tokens": 128}]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    arrivals = replay_schedule(WordTokenizer(), str(data), {"start_times": [10.0, 12.5, 11.0]})
    assert [(a.at_s, a.spec.cls, len(a.spec.prompt), a.spec.max_tokens) for a in arrivals] == [
        (0.0, "short", 128, 128), (1.0, "short", 128, 128), (2.5, "long", 2048, 4)]
    with pytest.raises(ValueError, match="disable-shuffle"):
        replay_schedule(WordTokenizer(), str(data), {"start_times": [1.0]})


def test_medians_within_tolerance_agree_and_outside_do_not() -> None:
    vllm = {"median_ttft_ms": 100.0, "median_itl_ms": 30.0, "completed": 60}

    def ours(ttft: float) -> dict[str, object]:
        return {"ttft_ms": {"p50": ttft}, "itl_ms": {"p50": 31.0}, "completed": 60}

    assert compare(ours(105.0), vllm, 0.10)["agree"]
    res = compare(ours(130.0), vllm, 0.10)
    assert not res["agree"] and not res["medians"]["ttft_ms"]["within"]
    assert res["medians"]["itl_ms"]["within"]


def test_together_schedule_is_the_dataset_in_order_at_poisson_times(tmp_path: Path) -> None:
    data = tmp_path / "half.jsonl"
    rows = [{"prompt": "a " * 128, "output_tokens": 128}, {"prompt": "b " * 2048,
                                                            "output_tokens": 4}]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    arrivals = dataset_schedule(WordTokenizer(), str(data), rate=0.1, duration_s=60, seed=1)
    assert [(a.spec.cls, a.spec.max_tokens) for a in arrivals] == [("short", 128), ("long", 4)]
    assert 0 < arrivals[0].at_s < arrivals[1].at_s


def test_spread_puts_both_tools_quantiles_side_by_side() -> None:
    from bench.stats import RequestRecord

    rec = RequestRecord("r0", "short", 128, 4, ttft_s=0.5, chunk_times_s=[1.0, 1.1, 1.3],
                        success=True)
    failed = RequestRecord("r1", "short", 128, 4, error="HTTP 500")
    vllm = {"itls": [[0.1, 0.2], []], "ttfts": [0.5, 0.0], "output_lens": [3, 0]}
    res = spread([rec, failed], vllm)
    assert res["itl_ms"]["p50"] == pytest.approx([150.0, 150.0])
    assert res["ttft_ms"]["p90"] == pytest.approx([500.0, 500.0])  # failed requests left out
    assert set(res["itl_ms"]) == {"p10", "p25", "p50", "p75", "p90"}
