"""The engine-level workloads of ``shared/bench/WORKLOADS.md`` (W1-W3) as timed runs.

Prompts are random token ids drawn uniformly from the vocabulary with a fixed
seed, so every engine gets exactly the same inputs. Each workload is a list of
timed runs (one ``generate`` call each); figures are derived from their median
times, so pdserve and any peer are measured by the same arithmetic.
"""

from __future__ import annotations

import random
import statistics
from dataclasses import dataclass


@dataclass(frozen=True)
class Run:
    name: str
    prompts: list[list[int]]
    max_tokens: int


def random_prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(vocab) for _ in range(length)] for _ in range(n)]


def runs_for(workload: str, vocab: int, seed: int = 0) -> list[Run]:
    if workload == "W1":
        return [Run("W1", random_prompts(32, 256, vocab, seed), 128)]
    if workload == "W2":
        prompt = random_prompts(1, 256, vocab, seed + 2)
        return [Run("W2", prompt, 256), Run("W2-ttft", prompt, 1)]
    if workload == "W3":
        return [Run("W3", random_prompts(1, 2048, vocab, seed + 3), 1)]
    raise ValueError(f"workload must be one of W1, W2, W3 for --engine, got {workload!r}")


def figures(workload: str, times: dict[str, list[float]]) -> dict[str, float]:
    """Headline figures from the median time of each run."""
    med = {name: statistics.median(ts) for name, ts in times.items()}
    if workload == "W1":
        return {"output_tok_s": 32 * 128 / med["W1"], "elapsed_s": med["W1"]}
    if workload == "W2":
        decode = med["W2"] - med["W2-ttft"]
        return {"decode_tok_s": 255 / decode, "tpot_ms": 1e3 * decode / 255,
                "ttft_ms": 1e3 * med["W2-ttft"]}
    return {"prefill_tok_s": 2048 / med["W3"], "ttft_ms": 1e3 * med["W3"]}


HEADLINE = {"W1": "output_tok_s", "W2": "decode_tok_s", "W3": "prefill_tok_s"}
