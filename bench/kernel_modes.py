"""Decode step time of the offline engine with kernels=auto vs torch vs cpu, one run.

    python -m bench.kernel_modes [--threads 1] [--batches 1 4] [--rounds 3]

Each mode gets its own engine on the default model; the modes are timed round-robin
(so drift of the machine hits each alike) and the median step is reported, with
each mode's ratio to kernels=torch measured in the same run.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

from pdserve.config import EngineConfig
from pdserve.engine.engine import LLMEngine
from pdserve.sampling_params import SamplingParams

MODES = ("torch", "cpu", "auto")
PROMPT, STEPS = 64, 24


def decode_step_s(engine: LLMEngine, batch: int, seed: int) -> float:
    """Median time of a decode step with ``batch`` requests, all past their prefill."""
    rng = random.Random(seed)
    params = SamplingParams(temperature=0, max_tokens=STEPS + 4, ignore_eos=True)
    for i in range(batch):
        ids = [rng.randrange(3, engine.spec.vocab_size) for _ in range(PROMPT)]
        engine.add_request(f"{seed}-{i}", ids, params)
    engine.step()  # the prefill (all prompts fit one step's budget)
    times = []
    for _ in range(STEPS):
        t0 = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - t0)
    while engine.has_unfinished_requests:
        engine.step()
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    engines = {m: LLMEngine(EngineConfig(dtype=args.dtype, kernels=m, num_threads=args.threads))
               for m in MODES}
    for m, e in engines.items():
        ops = e.model.ops
        print(m, type(ops).__name__, sorted(getattr(ops, "use", [])),
              "bf16 linear kernel:", getattr(e.model.layers[0].qkv, "_kernel", None) is not None)
    samples: dict[tuple[str, int], list[float]] = {}
    for r in range(args.rounds):
        for b in args.batches:
            for m in MODES:
                samples.setdefault((m, b), []).append(decode_step_s(engines[m], b, r))
    for b in args.batches:
        base = statistics.median(samples[("torch", b)])
        for m in MODES:
            t = statistics.median(samples[(m, b)])
            print(f"batch {b} kernels={m:5s} step {t * 1e3:7.2f} ms  torch/this {base / t:5.2f}x")


if __name__ == "__main__":
    main()
