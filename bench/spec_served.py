"""Speculative decoding on a disaggregated decode worker, after a KV import
(bench/spec_served.sh starts the clusters).

The same W6 prompts go to two running clusters, one whose decode worker speculates and
one whose does not, every prompt prefilled on the prefill worker and its KV imported:
all 16 at once, then the first alone. Per cluster and prompt set: decode tok/s (the
tokens after each request's first, over the span from the first first token to the
last token), and how many outputs are identical between the two clusters.

    python -m bench.spec_served --plain 127.0.0.1:50051 --spec 127.0.0.1:50151 --json out.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from typing import Any

from bench.grounded import W6_OUTPUT, grounded_prompts, load_tokenizer
from bench.machine import describe
from bench.spec_bench import pair_line, paired


async def _one(client: Any, prompt: list[int]) -> tuple[list[int], float, float, str]:
    tokens: list[int] = []
    first = last = 0.0
    plan = ""
    async for d in client.generate(prompt, max_tokens=W6_OUTPUT, ignore_eos=True,
                                   temperature=0.0):
        now = time.perf_counter()
        if d.token_ids:
            first = first or now
            last = now
        tokens += d.token_ids
        plan = (d.timings or {}).get("plan", plan)
    return tokens, first, last, plan


async def _measure(address: str, prompts: list[list[int]]) -> dict[str, Any]:
    from pdserve.client import AsyncClient

    client = AsyncClient(address, timeout=600)
    try:
        await _one(client, prompts[0][:32])  # warm-up
        runs = await asyncio.gather(*(_one(client, p) for p in prompts))
    finally:
        await client.close()
    span = max(r[2] for r in runs) - min(r[1] for r in runs)
    generated = sum(len(r[0]) - 1 for r in runs)
    return {"decode_tok_s": generated / span, "span_s": span,
            "plans": sorted({r[3] for r in runs}), "tokens": [r[0] for r in runs]}


def run(plain: str, spec: str) -> dict[str, Any]:
    w6 = grounded_prompts(load_tokenizer(None))
    out: dict[str, Any] = {"machine": describe(None)}
    for name, prompts in (("W6", w6), ("W6 x1", w6[:1])):
        out[name] = paired(asyncio.run(_measure(plain, prompts)),
                           asyncio.run(_measure(spec, prompts)))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--plain", required=True, help="router of the cluster without speculation")
    p.add_argument("--spec", required=True, help="router of the cluster with it")
    p.add_argument("--json", default=None)
    a = p.parse_args()
    res = run(a.plain, a.spec)
    for name in ("W6", "W6 x1"):
        print(pair_line(name, res[name], f"plans {res[name]['spec']['plans']}"))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
