"""The workloads of ``shared/bench/WORKLOADS.md`` as requests to a running server.

W1-W3 use exactly the prompts of ``pdserve bench --engine`` (``runs_for``), so
offline and served figures share their inputs. W6 (grounded) builds chat prompts
with the model's tokenizer (``bench/grounded.py``). Every prompt is sent as token
ids, never text: random ids need not survive a decode/encode round trip.

W4 is open loop: two independent Poisson processes (short 128/128 at
``rate_short``, long 2048/4 at ``rate_long``), arrival times drawn from
exponential gaps with a fixed seed, each request sent at its time whether or not
earlier ones have finished.
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass

from bench.progress import RequestTally
from bench.serving_client import Backend, RequestSpec, measure
from bench.stats import RequestRecord
from bench.workloads import random_prompts, runs_for

SHORT = (128, 128)
LONG = (2048, 4)
CLOSED = ("W1", "W2", "W3", "W6")


@dataclass(frozen=True)
class Arrival:
    at_s: float
    spec: RequestSpec


def poisson_times(rate: float, duration_s: float, seed: int) -> list[float]:
    """Arrival times in [0, duration) of a Poisson process of ``rate`` per second."""
    if rate <= 0:
        return []
    rng = random.Random(seed)
    times, t = [], rng.expovariate(rate)
    while t < duration_s:
        times.append(t)
        t += rng.expovariate(rate)
    return times


def w4_schedule(rate_short: float, rate_long: float, duration_s: float, vocab: int,
                seed: int = 0) -> list[Arrival]:
    arrivals = []
    for cls, (n_in, n_out), rate, s in (("short", SHORT, rate_short, seed + 40),
                                        ("long", LONG, rate_long, seed + 41)):
        times = poisson_times(rate, duration_s, s)
        prompts = random_prompts(len(times), n_in, vocab, s)
        arrivals += [Arrival(t, RequestSpec(f"W4-{cls}-{i}", cls, p, n_out))
                     for i, (t, p) in enumerate(zip(times, prompts, strict=True))]
    return sorted(arrivals, key=lambda a: a.at_s)


def unloaded_specs(vocab: int, n: int = 3, seed: int = 0) -> list[RequestSpec]:
    """Short requests sent one at a time before W4: the unloaded TTFT and TPOT."""
    return [RequestSpec(f"W4-unloaded-{i}", "unloaded", p, SHORT[1])
            for i, p in enumerate(random_prompts(n, SHORT[0], vocab, seed + 42))]


def closed_specs(workload: str, vocab: int, tokenizer_dir: str | None = None,
                 seed: int = 0) -> list[RequestSpec]:
    """The requests of W1, W2, W3 or W6, all sent at once."""
    if workload == "W6":
        from bench.grounded import W6_OUTPUT, grounded_prompts, load_tokenizer

        prompts = grounded_prompts(load_tokenizer(tokenizer_dir))
        return [RequestSpec(f"W6-{i}", "W6", p, W6_OUTPUT) for i, p in enumerate(prompts)]
    if workload not in CLOSED:
        raise ValueError(f"workload must be one of W1, W2, W3, W4, W6, got {workload!r}")
    run = runs_for(workload, vocab, seed)[0]  # W2's first run is the 256-token one
    return [RequestSpec(f"{workload}-{i}", workload, p, run.max_tokens)
            for i, p in enumerate(run.prompts)]


def with_run_ids(specs: list[RequestSpec], tag: str) -> list[RequestSpec]:
    """Unique request ids per repeat (servers may reject a reused id in flight)."""
    return [RequestSpec(f"{s.rid}-{tag}", s.cls, s.prompt, s.max_tokens) for s in specs]


async def _measured(backend: Backend, spec: RequestSpec, t0: float,
                    tally: RequestTally | None) -> RequestRecord:
    if tally is not None:
        tally.on_sent()
    rec = await measure(backend, spec, t0)
    if tally is not None:
        tally.on_done(rec.success)
    return rec


async def run_together(backend: Backend, specs: list[RequestSpec],
                       tally: RequestTally | None = None,
                       ) -> tuple[list[RequestRecord], float]:
    """Send every request at once; duration = first send → last completion."""
    t0 = time.perf_counter()
    records = await asyncio.gather(*(_measured(backend, s, t0, tally) for s in specs))
    return list(records), time.perf_counter() - t0


async def run_one_by_one(backend: Backend, specs: list[RequestSpec],
                         tally: RequestTally | None = None,
                         ) -> tuple[list[RequestRecord], float]:
    t0 = time.perf_counter()
    records = [await _measured(backend, s, t0, tally) for s in specs]
    return records, time.perf_counter() - t0


async def run_open_loop(backend: Backend, arrivals: list[Arrival],
                        tally: RequestTally | None = None,
                        ) -> tuple[list[RequestRecord], float]:
    """Send each request at its scheduled time, never waiting for earlier ones;
    duration = start → last completion (as ``vllm bench serve``)."""
    t0 = time.perf_counter()
    tasks = []
    for a in arrivals:
        delay = a.at_s - (time.perf_counter() - t0)
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(_measured(backend, a.spec, t0, tally)))
    records = await asyncio.gather(*tasks)
    return list(records), time.perf_counter() - t0


def long_rate_for(prefill_tok_s: float, share: float) -> float:
    """Long requests per second whose 2048-token prompts take ``share`` of a prefill
    capacity of ``prefill_tok_s`` (WORKLOADS.md: 30-50 % of one core's)."""
    if not 0 < share < 1:
        raise ValueError(f"--long-share must be in (0, 1), got {share}")
    return share * prefill_tok_s / LONG[0]
