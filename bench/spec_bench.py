"""n-gram speculative decoding, offline, in one run: ``pdserve bench --engine --workload W6``.

Two engines on the same prompts, one plain and one with ``--speculative-config``
(default ``SPEC``), each greedy with 256 output tokens per request, on three prompt
sets: W6 (16 grounded prompts: repeat a 512-token passage, bench/grounded.py), its
first prompt alone (W6 x1: one user, as a CPU decode worker near the user serves) and
free-form chat (16 questions under the chat template, nothing to copy). For each:
decode tok/s (output tokens over the generate call's time less the same prompts'
prefill, timed with one output token), the ratio with speculation over without, whether
all outputs are identical, and the drafts: acceptance rate and mean tokens accepted per
step that carried drafts. Prefix caching is off so repeats recompute their prompts.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

from bench.grounded import grounded_prompts, load_tokenizer
from bench.progress import Progress

SPEC = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 2,
        "prompt_lookup_max": 4}
OUTPUT_TOKENS = 256
CHAT = ["What is the capital of France?", "Explain how a refrigerator works.",
        "Write a short story about a lighthouse keeper.", "Why is the sky blue?",
        "Give me three tips for learning a new language.", "What causes the seasons?",
        "Describe the water cycle.", "How do vaccines work?", "What is a black hole?",
        "Summarize the plot of Romeo and Juliet.", "How do I bake bread at home?",
        "What are the benefits of regular exercise?", "Explain photosynthesis simply.",
        "What is machine learning?", "Why do cats purr?", "How does the internet work?"]


def chat_prompts(tokenizer: Any) -> list[list[int]]:
    return [[int(i) for i in tokenizer.apply_chat_template(
        [{"role": "user", "content": q}], add_generation_prompt=True, tokenize=True,
        return_dict=False)] for q in CHAT]


def run_spec_bench(model: str | None, dtype: str, threads: int, spec: dict[str, Any],
                   repeats: int, progress: Progress) -> dict[str, Any]:
    from pdserve import LLM

    tok = load_tokenizer(model)
    w6 = grounded_prompts(tok)
    sets = {"W6": w6, "W6 x1": w6[:1], "chat": chat_prompts(tok)}
    engines = {"plain": None, "spec": spec}
    out: dict[str, Any] = {"speculative_config": spec, "output_tokens": OUTPUT_TOKENS}
    results: dict[str, dict[str, Any]] = {name: {} for name in sets}
    steps = len(engines) * len(sets) * repeats
    with progress.bar("speculative decoding (W6, W6 x1, chat)", steps) as bar:
        for mode, config in engines.items():
            llm = LLM(model=model, dtype=dtype, num_threads=threads, speculative_config=config,
                      enable_prefix_caching=False)
            for name, prompts in sets.items():
                bar.show(f"{mode} {name}")
                results[name][mode] = _timed(llm, prompts, repeats, bar)
    for name, r in results.items():
        out[name] = paired(r["plain"], r["spec"])
    return out


def paired(plain: dict[str, Any], spec: dict[str, Any]) -> dict[str, Any]:
    """Two runs of the same prompts (each with ``decode_tok_s`` and every request's
    ``tokens``): both without their tokens, the speedup and the identical outputs."""
    return {"plain": _public(plain), "spec": _public(spec),
            "speedup": spec["decode_tok_s"] / plain["decode_tok_s"],
            "identical": sum(a == b for a, b in zip(plain["tokens"], spec["tokens"],
                                                    strict=True)),
            "requests": len(plain["tokens"])}


def pair_line(name: str, r: dict[str, Any], extra: str) -> str:
    return (f"{name:>6}: decode {r['plain']['decode_tok_s']:.1f} -> "
            f"{r['spec']['decode_tok_s']:.1f} tok/s = {r['speedup']:.2f}x; identical "
            f"{r['identical']}/{r['requests']}; {extra}")


def _timed(llm: Any, prompts: list[list[int]], repeats: int, bar: Any) -> dict[str, Any]:
    from pdserve import SamplingParams

    full = SamplingParams(temperature=0, max_tokens=OUTPUT_TOKENS, ignore_eos=True)
    first = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    sched = llm.engine.scheduler
    llm.generate(prompts[:1], first)  # warm-up
    prefill_s, total_s, tokens = [], [], []
    before = sched.counters()
    for _ in range(repeats):
        t0 = time.perf_counter()
        llm.generate(prompts, first)
        prefill_s.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        res = llm.generate(prompts, full)
        total_s.append(time.perf_counter() - t0)
        tokens = [r.token_ids for r in res]
        bar.advance()
    after = sched.counters()
    drafts = {k.removeprefix("spec_decode_num_"): after[k] - before[k]
              for k in after if k.startswith("spec_decode")}
    decode_s = statistics.median(total_s) - statistics.median(prefill_s)
    generated = sum(len(t) for t in tokens) - len(tokens)  # the first tokens are prefill's
    return {"decode_tok_s": generated / decode_s, "decode_s": decode_s,
            "prefill_s": statistics.median(prefill_s), "total_s": total_s, "tokens": tokens,
            "drafts": drafts,
            "acceptance_rate": drafts["accepted_tokens"] / drafts["draft_tokens"]
            if drafts["draft_tokens"] else None,
            "accepted_per_step": drafts["accepted_tokens"] / drafts["drafts"]
            if drafts["drafts"] else None}


def _public(r: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in r.items() if k != "tokens"}


def report_lines(res: dict[str, Any]) -> list[str]:
    lines = [f"speculative decoding {res['speculative_config']} vs plain, greedy, "
             f"{res['output_tokens']} output tokens per request (medians)"]
    for name in ("W6", "W6 x1", "chat"):
        r = res[name]
        s = r["spec"]
        acc = (f"acceptance {100 * s['acceptance_rate']:.0f}%, "
               f"{s['accepted_per_step']:.2f} accepted per draft step"
               if s["acceptance_rate"] is not None else "no drafts")
        lines.append(pair_line(name, r, acc))
    return lines
