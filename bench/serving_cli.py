"""Arguments and entry point of `pdserve bench --target URL [--target URL ...]`."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from bench.machine import describe as describe_machine
from bench.machine import line as machine_line

SERVED_DEFAULT = ["W1", "W2", "W3", "W4", "W6"]
W4_DURATION_S = 120.0


def add_serving_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("against running servers (--target)")
    g.add_argument("--target", action="append", default=[],
                   help="grpc://HOST:PORT (pdserve router) or http://HOST:PORT/v1 "
                        "(OpenAI-compatible); repeatable, measured one after the other")
    g.add_argument("--label", action="append", default=[],
                   help="name of each --target in tables, JSON and plots (same order)")
    g.add_argument("--model-name", default=None,
                   help="OpenAI 'model' field (default: the first of GET /v1/models)")
    g.add_argument("--api-key", default=os.environ.get("PDSERVE_API_KEY"),
                   help="bearer token for OpenAI targets (or PDSERVE_API_KEY)")
    g.add_argument("--duration", type=float, default=None,
                   help=f"W4 length in seconds (default {W4_DURATION_S:.0f}); --soak: its "
                        "length (default 1200)")
    g.add_argument("--rate-short", type=float, default=1.0,
                   help="W4 short requests (128 in / 128 out) per second")
    g.add_argument("--rate-long", type=float, default=None,
                   help="W4 long requests (2048 in / 4 out) per second; default: "
                        "--long-share of the prefill capacity / 2048")
    g.add_argument("--long-share", type=float, default=0.4,
                   help="share of one core's prefill capacity the long prompts take "
                        "(WORKLOADS.md: 0.3-0.5)")
    g.add_argument("--prefill-capacity", type=float, default=None,
                   help="one core's prefill tokens/s (default: measured with W3 on the "
                        "first target)")
    g.add_argument("--slo-ttft", type=float, default=None,
                   help="goodput SLO on TTFT, seconds (W4 default: 5x unloaded)")
    g.add_argument("--slo-tpot", type=float, default=None,
                   help="goodput SLO on TPOT, seconds (W4 default: 2x unloaded)")
    g.add_argument("--seed", type=int, default=0, help="prompts and arrival times")
    g.add_argument("--plot-dir", default=None, help="write PNG plots here")


def _targets(args: argparse.Namespace) -> list[tuple[str, str]]:
    if args.label and len(args.label) != len(args.target):
        raise ValueError(f"--label: give one per --target ({len(args.target)}), "
                         f"got {len(args.label)}")
    labels = args.label or list(args.target)
    if len(set(labels)) != len(labels):
        raise ValueError(f"--label: labels must be unique, got {labels}")
    return list(zip(labels, args.target, strict=True))


def run_served(args: argparse.Namespace) -> int:
    from bench.cli import vocab_of
    from bench.progress import progress_for
    from bench.serving_client import make_backend
    from bench.serving_report import render
    from bench.serving_run import ServeBenchConfig, run
    from bench.stats import SLO

    targets = _targets(args)
    for _, t in targets:
        make_backend(t)  # validate every URL before measuring anything
    workloads = args.workload or SERVED_DEFAULT
    if "W5" in workloads:
        raise ValueError("--workload W5 starts its own cluster; run it without --target")
    cfg = ServeBenchConfig(
        workloads=tuple(workloads), repeats=args.repeats, vocab=vocab_of(args.model),
        seed=args.seed, model_dir=args.model, model_name=args.model_name,
        api_key=args.api_key, rate_short=args.rate_short,
        duration_s=W4_DURATION_S if args.duration is None else args.duration,
        rate_long=args.rate_long, long_share=args.long_share,
        prefill_capacity=args.prefill_capacity, slo=SLO(args.slo_ttft, args.slo_tpot))
    doc = run(targets, cfg, progress_for(args.quiet))
    doc["machine"] = describe_machine()  # the client's; the targets' threads are their own
    print(render(doc))
    print(f"machine (client): {machine_line(doc['machine'])}")
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump(doc, f, indent=1)
    if args.plot_dir:
        from bench.plots import draw

        for path in draw(doc, args.plot_dir):
            print(f"plot: {path}")
    return _check_failures(doc)


def _check_failures(doc: dict[str, Any]) -> int:
    """Warn about failed requests; exit 1 when a workload had no successful one."""
    rc = 0
    for e in doc["targets"]:
        for w, res in e["workloads"].items():
            reqs = [r for run in res["runs"] for r in run["requests"]]
            bad = [r for r in reqs if not r["success"]]
            if bad:
                print(f"warning: {e['label']} {w}: {len(bad)} of {len(reqs)} requests failed, "
                      f"first error: {bad[0]['error']}", file=sys.stderr)
            if reqs and len(bad) == len(reqs):
                rc = 1
    return rc
