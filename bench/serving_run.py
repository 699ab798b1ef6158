"""`pdserve bench --target ...`: run the workloads against each server in turn.

For each target: open the backend, send one warm-up request, then per workload
W1-W3/W6 ``repeats`` runs (summary = element-wise median of the per-run
summaries) and W4 once: an unloaded phase (short requests one at a time, whose
median TTFT and TPOT set the default SLOs: 5× and 2×), then the open-loop mix.
The W4 rates are fixed once for all targets so the comparison is like for like.
"""

from __future__ import annotations

import asyncio
import dataclasses
from dataclasses import dataclass
from typing import Any

from bench.progress import Progress, QuietProgress, RequestTally
from bench.serving_bench import (
    LONG,
    closed_specs,
    long_rate_for,
    run_one_by_one,
    run_open_loop,
    run_together,
    unloaded_specs,
    w4_schedule,
    with_run_ids,
)
from bench.serving_client import Backend, RequestSpec, make_backend
from bench.stats import SLO, RequestRecord, median_of, summarize
from bench.workloads import random_prompts

REPEAT_SEED = 1000  # repeat i draws its prompts with seed + REPEAT_SEED * i


@dataclass(frozen=True)
class ServeBenchConfig:
    workloads: tuple[str, ...]
    repeats: int = 3
    vocab: int = 49152
    seed: int = 0
    model_dir: str | None = None
    """For the W6 tokenizer (None = the default model)."""
    model_name: str | None = None
    """The OpenAI ``model`` field (None = the first of GET /models)."""
    api_key: str | None = None
    duration_s: float = 120.0
    rate_short: float = 1.0
    rate_long: float | None = None
    long_share: float = 0.4
    prefill_capacity: float | None = None
    slo: SLO = SLO()

    def __post_init__(self) -> None:
        if self.repeats < 1:
            raise ValueError(f"--repeats must be >= 1, got {self.repeats}")
        if self.duration_s <= 0:
            raise ValueError(f"--duration must be > 0, got {self.duration_s}")
        if self.rate_short < 0 or (self.rate_long is not None and self.rate_long < 0):
            raise ValueError("--rate-short and --rate-long must be >= 0")


def records_json(records: list[RequestRecord]) -> list[dict[str, Any]]:
    return [dataclasses.asdict(r) | {"itl_s": r.itl_s} for r in records]


async def _warm_up(backend: Backend, vocab: int) -> None:
    spec = RequestSpec("warmup", "warmup", random_prompts(1, 16, vocab, 99)[0], 4)
    await run_one_by_one(backend, [spec])


async def _closed(backend: Backend, w: str, cfg: ServeBenchConfig,
                  progress: Progress, label: str) -> dict[str, Any]:
    # Fresh prompts per repeat (the same for every target): servers with a prefix cache
    # (pdserve's and vLLM's are on by default) would skip a repeated prompt's prefill.
    per_repeat = [closed_specs(w, cfg.vocab, cfg.model_dir, cfg.seed + REPEAT_SEED * i)
                  for i in range(cfg.repeats)]
    runs = []
    with progress.bar(f"{label} {w}", cfg.repeats * len(per_repeat[0]), unit="req") as bar:
        tally = RequestTally(bar)
        for i, specs in enumerate(per_repeat):
            bar.show(f"{label} {w} repeat {i + 1}/{cfg.repeats}")
            records, duration = await run_together(backend, with_run_ids(specs, f"r{i}"), tally)
            runs.append({"summary": summarize(records, duration, cfg.slo),
                         "requests": records_json(records)})
    summary = median_of([r["summary"] for r in runs])
    if w == "W3":
        ttft = summary["ttft_ms"]["p50"]
        summary["prefill_tok_s"] = LONG[0] / (ttft / 1e3) if ttft else None
    return {"summary": summary, "runs": runs}


async def _w4(backend: Backend, cfg: ServeBenchConfig, rate_long: float,
              progress: Progress, label: str) -> dict[str, Any]:
    specs = unloaded_specs(cfg.vocab, seed=cfg.seed)
    with progress.bar(f"{label} W4 unloaded (one at a time)", len(specs), unit="req") as bar:
        unloaded, _ = await run_one_by_one(backend, specs, RequestTally(bar))
    base = summarize(unloaded, 1.0)
    ttft0, tpot0 = base["ttft_ms"]["p50"], base["tpot_ms"]["p50"]
    if ttft0 is None or tpot0 is None:
        raise RuntimeError(f"W4 unloaded phase failed on {backend.target}: "
                           f"{[r.error for r in unloaded]}")
    slo = SLO(cfg.slo.ttft_s if cfg.slo.ttft_s is not None else 5 * ttft0 / 1e3,
              cfg.slo.tpot_s if cfg.slo.tpot_s is not None else 2 * tpot0 / 1e3)
    arrivals = w4_schedule(cfg.rate_short, rate_long, cfg.duration_s, cfg.vocab, cfg.seed)
    what = (f"{label} W4 open loop ({cfg.rate_short:g}/s short + {rate_long:.3g}/s long "
            f"for {cfg.duration_s:g} s)")
    with progress.bar(what, len(arrivals), unit="req", expected_s=cfg.duration_s) as bar:
        records, duration = await run_open_loop(backend, arrivals, RequestTally(bar))
    by_class = {c: [r for r in records if r.cls == c] for c in ("short", "long")}
    summary = {c: summarize(rs, duration, slo) for c, rs in by_class.items()}
    summary["all"] = summarize(records, duration, slo)
    return {"summary": summary, "slo": dataclasses.asdict(slo),
            "unloaded": {"ttft_ms": ttft0, "tpot_ms": tpot0, "requests": records_json(unloaded)},
            "rates": {"short": cfg.rate_short, "long": rate_long, "duration_s": cfg.duration_s},
            "long_arrivals_s": [a.at_s for a in arrivals if a.spec.cls == "long"],
            "runs": [{"requests": records_json(records)}]}


async def _measure_capacity(backend: Backend, cfg: ServeBenchConfig, progress: Progress,
                            label: str) -> float:
    """Prefill tokens/s of this target on W3 (unloaded, median TTFT of 3)."""
    ttfts = []
    with progress.bar(f"{label} W4 prefill capacity (W3 x3)", 3, unit="req") as bar:
        tally = RequestTally(bar)
        for i in range(3):  # a fresh prompt each time: a cached one would skip its prefill
            specs = closed_specs("W3", cfg.vocab, seed=cfg.seed + REPEAT_SEED * i)
            records, _ = await run_one_by_one(backend, with_run_ids(specs, f"cap{i}"), tally)
            if not records[0].success:
                raise RuntimeError(f"W3 capacity probe failed: {records[0].error}")
            ttfts.append(records[0].ttft_s)
    return LONG[0] / sorted(ttfts)[1]


async def run_targets(targets: list[tuple[str, str]], cfg: ServeBenchConfig,
                      progress: Progress) -> dict[str, Any]:
    """Measure every (label, target) in order; returns the whole JSON document."""
    out: dict[str, Any] = {"config": _config_json(cfg), "targets": []}
    rate_long = cfg.rate_long
    for label, target in targets:
        backend = make_backend(target, cfg.model_name, cfg.api_key)
        await backend.start()
        try:
            await _warm_up(backend, cfg.vocab)
            entry: dict[str, Any] = {"label": label, "target": target, "workloads": {}}
            if "W4" in cfg.workloads and rate_long is None:
                capacity = cfg.prefill_capacity or await _measure_capacity(
                    backend, cfg, progress, label)
                rate_long = long_rate_for(capacity, cfg.long_share)
                out["config"]["w4_rates"] = {
                    "prefill_capacity_tok_s": capacity, "measured_on": (
                        "--prefill-capacity" if cfg.prefill_capacity else label),
                    "long_share": cfg.long_share, "rate_long": rate_long}
            for w in cfg.workloads:
                if w == "W4":
                    assert rate_long is not None
                    entry["workloads"][w] = await _w4(backend, cfg, rate_long, progress, label)
                else:
                    entry["workloads"][w] = await _closed(backend, w, cfg, progress, label)
            out["targets"].append(entry)
        finally:
            await backend.close()
    return out


def _config_json(cfg: ServeBenchConfig) -> dict[str, Any]:
    d = dataclasses.asdict(cfg)
    d.pop("api_key")
    return d


def run(targets: list[tuple[str, str]], cfg: ServeBenchConfig,
        progress: Progress | None = None) -> dict[str, Any]:
    return asyncio.run(run_targets(targets, cfg, progress or QuietProgress()))
