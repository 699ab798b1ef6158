"""Cross-check `pdserve bench` against `vllm bench serve` on the same W4 load.

`vllm bench serve` cannot run two Poisson processes, but their superposition is
one: W4 (short 128/128 at rate Rs, long 2048/4 at rate Rl) is a Poisson process of
rate Rs + Rl whose arrivals are long with probability Rl / (Rs + Rl). ``dataset``
writes that mix as a `custom` dataset (text prompts of exactly 128 or 2,048 tokens
for the model's tokenizer, each with its ``output_tokens``) and prints the `vllm
bench serve` command (through bench/peer_bench_serve.py, in vLLM's venv; no
shuffle, detailed results). ``replay`` then sends the very same requests at the
very same offsets vLLM's client sent them (its ``start_times``) with `pdserve
bench`'s client and statistics, and checks that the TTFT and ITL medians over all
requests agree within a tolerance (default 10 %), and prints both tools' p10-p90
side by side (a median that falls between two modes of the ITL distribution, one
per decode batch size, is worth checking against its neighbours). Replaying the
schedule matters: near saturation two independent Poisson draws give medians
further apart than any measurement difference. ``together`` is the other way to hold the server's
state equal: both clients at once, each sending half of W4's mix (one run,
measured by both tools).

    python -m bench.vllm_crosscheck dataset --tokenizer MD --rate-short 0.15 \
        --rate-long 0.02 --duration 180 --out w4_mix.jsonl
    <the printed vllm bench serve command>
    python -m bench.vllm_crosscheck replay --target http://127.0.0.1:8000/v1 \
        --tokenizer MD --dataset w4_mix.jsonl --vllm vllm_w4.json --json out.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
from typing import Any

import numpy as np

from bench.serving_bench import LONG, SHORT, Arrival, poisson_times, run_open_loop
from bench.serving_client import RequestSpec, make_backend
from bench.stats import RequestRecord, summarize

SPREAD_QUANTILES = (10, 25, 50, 75, 90)


def text_of_length(tokenizer: Any, n: int, rng: random.Random) -> str:
    """Text that the tokenizer encodes to exactly ``n`` tokens (no special tokens)."""
    vocab = tokenizer.vocab_size
    ids = [rng.randrange(vocab) for _ in range(n)]
    for _ in range(20):
        text = tokenizer.decode(ids, skip_special_tokens=True)
        ids = tokenizer.encode(text, add_special_tokens=False)
        if len(ids) == n:
            return str(text)
        ids = (ids + [rng.randrange(vocab) for _ in range(n)])[:n]
    raise RuntimeError(f"no text of exactly {n} tokens found")


def write_dataset(tokenizer_dir: str, rate_short: float, rate_long: float,
                  duration_s: float, out: str, seed: int = 0) -> int:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    rng = random.Random(seed)
    total = round((rate_short + rate_long) * duration_s)
    p_long = rate_long / (rate_short + rate_long)
    with open(out, "w") as f:
        for _ in range(total):
            n_in, n_out = LONG if rng.random() < p_long else SHORT
            f.write(json.dumps({"prompt": text_of_length(tok, n_in, rng),
                                "output_tokens": n_out}) + "\n")
    return total


def vllm_command(dataset: str, total: int, rate: float, model_name: str, tokenizer_dir: str,
                 base_url: str, vllm_python: str) -> str:
    return (f"{vllm_python} bench/peer_bench_serve.py --backend openai --base-url {base_url} "
            f"--endpoint /v1/completions --model {model_name} --tokenizer {tokenizer_dir} "
            f"--dataset-name custom --dataset-path {dataset} --skip-chat-template "
            f"--custom-output-len -1 --num-prompts {total} --request-rate {rate} "
            f"--ignore-eos --temperature 0 --seed 0 --disable-shuffle --save-result --save-detailed "
            f"--result-filename vllm_w4.json")


def dataset_specs(tokenizer: Any, dataset: str, prefix: str) -> list[RequestSpec]:
    """The dataset's requests in file order, prompts as token ids, classed by length."""
    specs = []
    for i, line in enumerate(line for line in open(dataset) if line.strip()):
        row = json.loads(line)
        ids = tokenizer.encode(row["prompt"], add_special_tokens=False)
        cls = "long" if len(ids) == LONG[0] else "short"
        specs.append(RequestSpec(f"{prefix}-{i}", cls, ids, int(row["output_tokens"])))
    return specs


def replay_schedule(tokenizer: Any, dataset: str, vllm_doc: dict[str, Any]) -> list[Arrival]:
    """vLLM's requests (dataset order, as sent without shuffle) at vLLM's send offsets."""
    specs = dataset_specs(tokenizer, dataset, "xc")
    starts = vllm_doc["start_times"]
    if len(starts) != len(specs):
        raise ValueError(f"vLLM's result has {len(starts)} requests, the dataset {len(specs)}: "
                         "was vllm bench serve run on this dataset with --disable-shuffle?")
    t0 = min(starts)
    arrivals = [Arrival(start - t0, spec) for spec, start in zip(specs, starts, strict=True)]
    return sorted(arrivals, key=lambda a: a.at_s)


async def replay(target: str, model_name: str | None, arrivals: list[Arrival],
                 ) -> tuple[dict[str, Any], list[RequestRecord]]:
    backend = make_backend(target, model_name, None)
    await backend.start()
    try:
        records, duration = await run_open_loop(backend, arrivals)
    finally:
        await backend.close()
    return summarize(records, duration), records


def dataset_schedule(tokenizer: Any, dataset: str, rate: float, duration_s: float,
                     seed: int) -> list[Arrival]:
    """The dataset's requests, in order, at Poisson times of ``rate`` (as vLLM sends)."""
    specs = dataset_specs(tokenizer, dataset, "xt")
    times = poisson_times(rate, duration_s * 10, seed)[:len(specs)]
    return [Arrival(at, spec) for spec, at in zip(specs, times, strict=True)]


async def together(vllm_cmd: str, target: str, arrivals: list[Arrival],
                   ) -> tuple[dict[str, Any], list[RequestRecord]]:
    """vLLM's client and pdserve bench's client load the server at the same time, each
    with half of the W4 mix: one run, both tools measuring the same server state."""
    proc = await asyncio.create_subprocess_shell(vllm_cmd, stdout=asyncio.subprocess.PIPE,
                                                 stderr=asyncio.subprocess.STDOUT)
    assert proc.stdout is not None
    while line := (await proc.stdout.readline()).decode():
        print(line, end="")
        if "Starting main benchmark run" in line:
            break
    ours = asyncio.create_task(replay(target, None, arrivals))
    while line := (await proc.stdout.readline()).decode():
        print(line, end="")
    if await proc.wait() != 0:
        raise RuntimeError(f"vllm bench serve failed: {vllm_cmd}")
    return await ours


def spread(records: list[RequestRecord], vllm: dict[str, Any]) -> dict[str, Any]:
    """Both tools' ITL and TTFT quantiles side by side (ms): a median can sit in a gap
    between two modes of a multi-modal distribution, so agreement is judged on the
    whole distribution as well."""
    ok = [r for r in records if r.success]
    ours = {"itl": [g for r in ok for g in r.itl_s], "ttft": [r.ttft_s for r in ok]}
    theirs = {"itl": [g for req in vllm["itls"] for g in req],
              "ttft": [t for t, ok_ in zip(vllm["ttfts"], vllm["output_lens"], strict=True)
                       if ok_]}
    return {f"{key}_ms": {f"p{q}": [1e3 * float(np.percentile(ours[key], q)),
                                    1e3 * float(np.percentile(theirs[key], q))]
                          for q in SPREAD_QUANTILES}
            for key in ("itl", "ttft")}


def compare(pdserve: dict[str, Any], vllm: dict[str, Any], tolerance: float) -> dict[str, Any]:
    """Medians over all requests: pdserve's summary vs vLLM's result file."""
    rows = {}
    for key, theirs in (("ttft_ms", "median_ttft_ms"), ("itl_ms", "median_itl_ms")):
        a, b = pdserve[key]["p50"], vllm[theirs]
        diff = abs(a - b) / statistics.mean((a, b))
        rows[key] = {"pdserve_bench": a, "vllm_bench_serve": b, "rel_diff": diff,
                     "within": diff <= tolerance}
    return {"medians": rows, "tolerance": tolerance,
            "completed": {"pdserve_bench": pdserve["completed"],
                          "vllm_bench_serve": vllm["completed"]},
            "agree": all(r["within"] for r in rows.values())}


def _print_comparison(res: dict[str, Any]) -> None:
    for key, r in res["medians"].items():
        print(f"{key:8} pdserve bench {r['pdserve_bench']:8.1f}  vllm bench serve "
              f"{r['vllm_bench_serve']:8.1f}  diff {100 * r['rel_diff']:4.1f}% "
              f"{'ok' if r['within'] else 'OVER'}")
    for key, qs in res["quantiles_pdserve_vs_vllm"].items():
        print(f"{key:8} " + "  ".join(f"{q} {a:.0f}/{b:.0f}" for q, (a, b) in qs.items()))


def _together(a: argparse.Namespace, tok: Any,
              ) -> tuple[str, tuple[dict[str, Any], list[RequestRecord]]]:
    half_s, half_l = a.rate_short / 2, a.rate_long / 2
    theirs, ours = f"{a.workdir}/w4_half_vllm.jsonl", f"{a.workdir}/w4_half_pdserve.jsonl"
    total = write_dataset(a.tokenizer, half_s, half_l, a.duration, theirs, seed=0)
    write_dataset(a.tokenizer, half_s, half_l, a.duration, ours, seed=1)
    base = a.target.removesuffix("/v1")
    cmd = vllm_command(theirs, total, half_s + half_l, a.model_name, a.tokenizer, base,
                       a.vllm_python) + f" --result-dir {a.workdir}"
    arrivals = dataset_schedule(tok, ours, half_s + half_l, a.duration, seed=1)
    return f"{a.workdir}/vllm_w4.json", asyncio.run(together(cmd, a.target, arrivals))


def _parser() -> argparse.ArgumentParser:
    mix = argparse.ArgumentParser(add_help=False)  # W4's mix, for vLLM's client
    mix.add_argument("--tokenizer", required=True, help="the model directory")
    mix.add_argument("--rate-short", type=float, required=True)
    mix.add_argument("--rate-long", type=float, required=True)
    mix.add_argument("--duration", type=float, default=120.0)
    mix.add_argument("--model-name", default="smollm2-135m-instruct")
    mix.add_argument("--vllm-python", default="/work/vllm-venv/bin/python")
    check = argparse.ArgumentParser(add_help=False)  # the comparison
    check.add_argument("--tolerance", type=float, default=0.10)
    check.add_argument("--json", default=None, help="also write the comparison here")
    p = argparse.ArgumentParser(prog="python -m bench.vllm_crosscheck")
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("dataset", parents=[mix],
                       help="write W4's mix as a vllm bench serve custom dataset")
    d.add_argument("--out", required=True)
    d.add_argument("--base-url", default="http://127.0.0.1:8000")
    t = sub.add_parser("together", parents=[mix, check],
                       help="both tools at once, each with half of W4's mix")
    t.add_argument("--target", required=True, help="OpenAI base URL, e.g. http://H:P/v1")
    t.add_argument("--workdir", required=True, help="datasets and vLLM's result go here")
    r = sub.add_parser("replay", parents=[check],
                       help="vLLM's schedule with pdserve bench's client; compare")
    r.add_argument("--target", required=True, help="the server vllm bench serve measured")
    r.add_argument("--tokenizer", required=True, help="the model directory")
    r.add_argument("--dataset", required=True)
    r.add_argument("--vllm", required=True, help="vllm bench serve --save-detailed result")
    r.add_argument("--model-name", default=None)
    return p


def _request_rows(records: list[RequestRecord]) -> list[dict[str, Any]]:
    return [{"rid": r.rid, "cls": r.cls, "start_s": r.start_s, "ttft_ms": 1e3 * r.ttft_s,
             "itls_ms": [1e3 * g for g in r.itl_s], "error": r.error} for r in records]


def main(argv: list[str] | None = None) -> int:
    a = _parser().parse_args(argv)
    if a.cmd == "dataset":
        total = write_dataset(a.tokenizer, a.rate_short, a.rate_long, a.duration, a.out)
        print(vllm_command(a.out, total, a.rate_short + a.rate_long, a.model_name,
                           a.tokenizer, a.base_url, a.vllm_python))
        return 0
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(a.tokenizer)
    if a.cmd == "together":
        vllm_path, (summary, records) = _together(a, tok)
        with open(vllm_path) as f:
            vllm_doc = json.load(f)
    else:
        with open(a.vllm) as f:
            vllm_doc = json.load(f)
        arrivals = replay_schedule(tok, a.dataset, vllm_doc)
        summary, records = asyncio.run(replay(a.target, a.model_name, arrivals))
    res = compare(summary, vllm_doc, a.tolerance)
    res["quantiles_pdserve_vs_vllm"] = spread(records, vllm_doc)
    res["pdserve_summary"] = summary
    res["pdserve_requests"] = _request_rows(records)
    _print_comparison(res)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=2)
    return 0 if res["agree"] else 1


if __name__ == "__main__":
    sys.exit(main())
