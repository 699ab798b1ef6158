"""``pdserve bench --chaos`` and ``pdserve bench --soak``: a cluster of real processes
(router, prefill worker, decode workers, a hostile prefill peer; the default model
unless ``--model``) driven by the chaos harness (bench/chaos/, shared with tests/chaos).

``--chaos``: the fault-free outputs of a prompt pool first, then ``--requests`` requests
(gRPC and OpenAI HTTP, some streamed, some hostile-tagged or misbehaving clients) while
workers and peers are killed (-9, then restarted), stopped and resumed. Prints and
writes: requests, faulted, completed identical, failed with a clear status, hung,
leaked blocks, migrated; exit 1 when an invariant broke (bench/chaos/invariants.py).

``--soak``: no faults. A warm-up (the fault-free outputs, then a closed loop that
measures capacity in requests/s), then ``--duration`` seconds (default 1200) at
``--rate`` (default 70 % of that capacity). RSS of every process and KV blocks in use
at start and end (RSS sampled every ``--sample-every`` seconds too), errors; exit 1
when an RSS grew more than 5 %, blocks are not back to baseline, or a request failed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.chaos.cluster import ChaosCluster, ClusterSpec
from bench.chaos.invariants import Report, check, idle_workers
from bench.chaos.load import LoadGenerator, Prompt, RequestSpec, prompt_pool
from bench.chaos.scenario import TRANSPORTS, ChaosPlan, reference, run_chaos
from bench.chaos_args import SOAK_DURATION_S

SOAK_LOAD_SHARE = 0.7
RSS_TOLERANCE = 0.05


def run_chaos_bench(args: argparse.Namespace) -> int:
    with _cluster(args, hostile=True) as (cluster, prompts):
        plan = ChaosPlan(requests=args.requests, prompts=len(prompts),
                         process_faults=args.process_faults or max(4, args.requests // 25),
                         rate=args.rate or 4.0, concurrency=args.concurrency,
                         deadline_s=args.deadline, settle_s=10.0, seed=args.seed)
        report, took = run_chaos(cluster, prompts, plan)
    figures = report.figures()
    print(f"pdserve bench --chaos ({took:.0f} s of load, model {cluster.spec.model})")
    for k, v in figures.items():
        print(f"  {k:<28} {v}")
    if not report.ok:
        print("violations:\n" + report.describe(limit=50))
    _write(args, {"chaos": figures, "violations": report.describe(limit=1000).splitlines()})
    return 0 if report.ok else 1


def run_soak_bench(args: argparse.Namespace) -> int:
    duration = args.duration if args.duration is not None else SOAK_DURATION_S
    with _cluster(args, hostile=False) as (cluster, prompts):
        load = LoadGenerator(cluster.router_address, cluster.http_url, prompts, args.deadline)
        ref = asyncio.run(reference(load, len(prompts), tag="warmup"))
        capacity = asyncio.run(_capacity(load, len(prompts), args.concurrency))
        rate = args.rate or SOAK_LOAD_SHARE * capacity
        start = _snapshot(cluster)
        n = max(1, int(duration * rate))
        specs = [RequestSpec(f"soak-{i:06d}", i % len(prompts), TRANSPORTS[i % len(TRANSPORTS)])
                 for i in range(n)]
        samples: list[dict[str, Any]] = []
        t0 = time.monotonic()
        outcomes = asyncio.run(_sampled(load, specs, rate, args, cluster, samples))
        took = time.monotonic() - t0
        report = check(cluster, outcomes, ref, [], cluster.procs["router"].pid, 10.0)
        end = _snapshot(cluster)
    result = _soak_result(report, start, end, capacity, rate, took, samples)
    _print_soak(result)
    _write(args, {"soak": result})
    return 0 if result["passed"] else 1


class _cluster:  # noqa: N801 - used as a context manager, reads like a function
    """Start the cluster (and its prompt pool); stop it on the way out."""

    def __init__(self, args: argparse.Namespace, hostile: bool) -> None:
        from pdserve.model_files import resolve_model

        model = str(resolve_model(args.model))
        logs = Path(args.log_dir or tempfile.mkdtemp(prefix="pdserve-chaos-"))
        spec = ClusterSpec(model=model, dtype=args.dtype, decode_workers=args.decode_workers,
                           hostile_peers=1 if hostile else 0, sweep_router=False)
        self.cluster = ChaosCluster(spec, logs)
        print(f"cluster logs: {logs}")

    def __enter__(self) -> tuple[ChaosCluster, list[Prompt]]:
        self.cluster.start()
        vocab = self.cluster.vocab_size
        return self.cluster, prompt_pool(32, vocab, seed=0, max_prompt=400, max_new=48)

    def __exit__(self, *exc: object) -> None:
        self.cluster.close()


async def _capacity(load: LoadGenerator, n_prompts: int, concurrency: int) -> float:
    """Completed requests per second, closed loop at ``concurrency``."""
    specs = [RequestSpec(f"capacity-{i}", i % n_prompts, TRANSPORTS[i % len(TRANSPORTS)])
             for i in range(4 * concurrency)]
    t0 = time.monotonic()
    outcomes = await load.run(specs, rate=0, concurrency=concurrency)
    done = sum(1 for o in outcomes if o.status == "completed")
    return done / (time.monotonic() - t0)


async def _sampled(load: LoadGenerator, specs: list[RequestSpec], rate: float,
                   args: argparse.Namespace, cluster: ChaosCluster,
                   samples: list[dict[str, Any]]) -> list[Any]:
    """The load, with the cluster's RSS sampled alongside."""
    task = asyncio.create_task(load.run(specs, rate, args.concurrency))
    t0 = time.monotonic()
    while not task.done():
        samples.append({"t_s": round(time.monotonic() - t0, 1), "rss": cluster.rss()})
        await asyncio.wait([task], timeout=args.sample_every)
    return task.result()


def _snapshot(cluster: ChaosCluster) -> dict[str, Any]:
    blocks = {p.name: round(cluster.metrics(p.name).get("pdserve:kv_cache_usage_perc", 0.0)
                            * cluster.kv_blocks(p.name))
              for p in cluster.of_role("prefill") + cluster.of_role("decode") if p.alive}
    return {"rss": cluster.rss(), "blocks_in_use": blocks,
            "busy": idle_workers(cluster, settle_s=10.0)}


def _soak_result(report: Report, start: dict[str, Any], end: dict[str, Any], capacity: float,
                 rate: float, took: float, samples: list[dict[str, Any]]) -> dict[str, Any]:
    growth = {n: (end["rss"].get(n, 0) - r) / r for n, r in start["rss"].items() if r}
    figures = report.figures()
    errors = len(report.violations)
    passed = (all(abs(g) <= RSS_TOLERANCE for g in growth.values()) and not errors and
              end["blocks_in_use"] == start["blocks_in_use"] and not report.crashed)
    return {"capacity_rps": capacity, "rate_rps": rate, "duration_s": took,
            "requests": figures["requests"], "completed_identical": figures["completed_identical"],
            "errors": errors, "rss_start": start["rss"], "rss_end": end["rss"],
            "rss_growth": growth, "blocks_start": start["blocks_in_use"],
            "blocks_end": end["blocks_in_use"], "crashed": report.crashed,
            "violations": report.describe(limit=50).splitlines(), "rss_samples": samples,
            "passed": passed}


def _print_soak(r: dict[str, Any]) -> None:
    print(f"pdserve bench --soak: {r['duration_s']:.0f} s at {r['rate_rps']:.2f} req/s "
          f"({100 * r['rate_rps'] / max(r['capacity_rps'], 1e-9):.0f}% of the "
          f"{r['capacity_rps']:.2f} req/s measured in the warm-up)")
    print(f"  requests {r['requests']}, completed identical {r['completed_identical']}, "
          f"errors {r['errors']}")
    for name, start in r["rss_start"].items():
        end = r["rss_end"].get(name, 0)
        print(f"  RSS {name:<12} {start / 2**20:8.1f} MiB -> {end / 2**20:8.1f} MiB "
              f"({100 * r['rss_growth'][name]:+.1f}%)")
    print(f"  KV blocks in use: start {r['blocks_start']}, end {r['blocks_end']}")
    print("  PASSED" if r["passed"] else "  FAILED: " + "; ".join(r["violations"][:5]))


def _write(args: argparse.Namespace, data: dict[str, Any]) -> None:
    if args.json_path:
        from bench.machine import describe

        with open(args.json_path, "w") as f:
            json.dump({"machine": describe(1), **data}, f, indent=2)
