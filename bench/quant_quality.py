"""int8 weight-only quantization against bf16 on the default model, in one run.

Reports, for bf16, int8 (LM head quantized too) and int8 with a bf16 LM head:
  - agreement: the share of the parity prompts (tests/integration/
    test_default_model_parity.py) whose first 32 greedy tokens equal bf16's;
  - perplexity on a fixed text (the docstrings of a fixed list of standard-library
    modules, the first ``PPL_TOKENS`` tokens; present on any machine), from the
    model's own forward with logits at every position (the serving path unchanged);
  - weight memory: bytes resident, and bytes one decode step reads;
  - speed: W1, W2, W3 (bench/workloads.py) timed in the same process;
  - ``--decode-step``: the batch-1 decode step (model forward) of bf16 and int8,
    interleaved in one process, so their ratio holds on a busy machine;
  - ``--crossover``: the int8 kernel against dequantize-then-GEMM per batch size M
    (sets int8_linear.INT8_SMALL_BATCH).

Figures go to bench/results/int8_quality.json.
Run: ``python -m bench.quant_quality [--threads N] [--repeats R] [--no-speed]``.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import importlib
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).with_name("results") / "int8_quality.json"
N_AGREE = 32
PPL_TOKENS = 2048
PPL_MODULES = ("argparse", "subprocess", "json", "re", "heapq", "itertools", "collections",
               "unittest", "random", "string", "typing", "csv")
# name -> (EngineConfig.quantization, linear.INT8_LM_HEAD)
VARIANTS: dict[str, tuple[str | None, bool]] = {
    "bf16": (None, True), "int8": ("int8", True), "int8_head_bf16": ("int8", False)}


def ppl_text() -> str:
    docs = [importlib.import_module(m).__doc__ or "" for m in PPL_MODULES]
    return "\n\n".join(d.strip() for d in docs)


def make_llm(variant: str, threads: int) -> Any:
    from pdserve import LLM
    from pdserve.engine import linear

    quantization, linear.INT8_LM_HEAD = VARIANTS[variant]
    return LLM(dtype="bfloat16", num_threads=threads, quantization=quantization)


def token_logprobs(engine: Any, ids: list[int]) -> torch.Tensor:
    """log p(ids[i + 1] | ids[: i + 1]) for every i, one prefill forward of an idle
    engine with logits at every row (its first blocks hold the sequence's KV)."""
    from pdserve.engine.model import ForwardBatch, PrefillSegment

    assert engine.blocks.all_free(), "the engine must be idle"
    n, bs = len(ids), engine.config.block_size
    pos = torch.arange(n)
    table = torch.arange(-(-n // bs))  # block b holds positions [b bs, (b + 1) bs): slot = pos
    fb = ForwardBatch(input_ids=torch.tensor(ids), positions=pos, slot_mapping=pos,
                      num_decode=0, decode_block_tables=None, decode_seq_lens=None,
                      prefills=[PrefillSegment(0, n, 0, table)], logits_indices=pos[:-1])
    with torch.inference_mode():
        logits = engine.model.forward(fb, engine.kv)  # (n - 1, V)
        return torch.log_softmax(logits.float(), -1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0]


def greedy(llm: Any, prompts: list[list[int]]) -> list[list[int]]:
    from pdserve import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=N_AGREE, min_tokens=N_AGREE)
    return [list(o.token_ids) for o in llm.generate(prompts, params)]


def weight_bytes(model: Any) -> dict[str, int]:
    """Resident bytes of every weight tensor (shared storage counted once), and the
    bytes one batch-1 decode step reads (layers + LM head)."""
    linears = [lin for w in model.layers for lin in (w.qkv, w.o, w.gate_up, w.down)]
    tensors = [model.embed, model.norm] + [t for w in model.layers for t in (w.in_norm,
                                                                              w.post_norm)]
    for lin in [*linears, model.lm_head]:
        for slot in type(lin).__slots__:
            v = getattr(lin, slot, None)
            if isinstance(v, torch.Tensor):
                tensors.append(v)
    seen: dict[int, int] = {}
    for t in tensors:
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    step = sum(lin.read_bytes for lin in [*linears, model.lm_head])
    return {"resident_bytes": sum(seen.values()), "decode_step_read_bytes": step}


def quality(variant: str, llm: Any, prompts: list[list[int]], text_ids: list[int],
            ref: dict[str, Any] | None) -> dict[str, Any]:
    outs = greedy(llm, prompts)
    lp = token_logprobs(llm.engine, text_ids)
    out: dict[str, Any] = {"perplexity": float(torch.exp(-lp.mean())),
                           "continuations": outs, **weight_bytes(llm.engine.model)}
    if ref is not None:
        same = sum(a == b for a, b in zip(outs, ref["continuations"], strict=True))
        out["first_difference"] = [_first_difference(a, b)
                                   for a, b in zip(outs, ref["continuations"], strict=True)]
        out["identical_first32"] = same
        out["identical_first32_share"] = same / len(outs)
        out["perplexity_change"] = out["perplexity"] / ref["perplexity"] - 1
        out["resident_vs_bf16"] = out["resident_bytes"] / ref["resident_bytes"]
    print(f"{variant:>15}: ppl {out['perplexity']:.4f}"
          + ("" if ref is None else f" ({100 * out['perplexity_change']:+.3f}%), identical "
             f"first-32 {out['identical_first32']}/{len(outs)}")
          + f", weights {out['resident_bytes'] / 2**20:.1f} MiB resident, "
          f"{out['decode_step_read_bytes'] / 2**20:.1f} MiB read per decode step", flush=True)
    return out


def _first_difference(a: list[int], b: list[int]) -> int | None:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), None)


def speed(variants: list[str], threads: int, repeats: int) -> dict[str, Any]:
    from bench.engine_bench import time_pdserve
    from bench.workloads import HEADLINE, figures, runs_for
    from pdserve.engine import linear

    runs = [r for w in ("W1", "W2", "W3") for r in runs_for(w, 49152)]
    out: dict[str, Any] = {}
    for v in variants:
        quantization, linear.INT8_LM_HEAD = VARIANTS[v]
        raw = time_pdserve(runs, repeats, "bfloat16", threads, None, quantization)
        times = {r["name"]: r["times_s"] for r in raw["runs"]}
        out[v] = {w: figures(w, {k: t for k, t in times.items() if k.startswith(w)})
                  for w in HEADLINE}
        out[v]["ceilings"] = raw["ceilings"]
        print(v, {w: round(out[v][w][HEADLINE[w]], 1) for w in HEADLINE}, flush=True)
    for v in variants[1:]:
        out[v]["vs_bf16"] = {w: out[v][w][HEADLINE[w]] / out["bf16"][w][HEADLINE[w]]
                             for w in HEADLINE}
        out[v]["W2_share_of_ceiling"] = (out[v]["W2"]["decode_tok_s"]
                                         / out[v]["ceilings"]["W2"])
    return out


def crossover(threads: int) -> dict[str, Any]:
    """ms per call of the int8 kernel and of dequantize + GEMM, SmolLM2's gate|up
    (3072 x 576) and down (576 x 1536), by batch rows M; and bf16's Linear."""
    from pdserve.engine.int8_linear import Int8Linear
    from pdserve.engine.linear import Linear, compute_dtype_for

    torch.set_num_threads(threads)
    compute = compute_dtype_for(torch.bfloat16, torch.device("cpu"))
    out: dict[str, Any] = {}
    for name, (n, k) in {"gate_up": (3072, 576), "down": (576, 1536)}.items():
        w = torch.randn(n, k) * 0.02
        q8, bf = Int8Linear(w, None, compute), Linear(w, None, torch.bfloat16, compute)
        rows = []
        for m in (1, 2, 4, 8, 16, 24, 32, 48, 64, 128):
            x = torch.randn(m, k).to(compute)
            rows.append({"M": m, "int8_kernel_ms": _ms(q8._small_batch, x),
                         "int8_dequant_gemm_ms": _ms(q8._large_batch, x),
                         "bf16_linear_ms": _ms(bf, x)})
            print(name, rows[-1], flush=True)
        out[name] = rows
    return out


def decode_step(threads: int, rounds: int = 7, reps: int = 10, context: int = 72
                ) -> dict[str, Any]:
    """ms of one batch-1 decode forward, bf16 and int8 taking turns (``rounds`` turns of
    ``reps`` steps each; the median step of each turn, then the median over turns)."""
    from bench.decode_step_bench import BLOCK, _decode_batch
    from pdserve.engine.kv_cache import KVCache

    models = {v: make_llm(v, threads).engine.model for v in ("bf16", "int8")}
    torch.set_num_threads(threads)
    fb = _decode_batch(1, context)
    turns: dict[str, list[float]] = {v: [] for v in models}
    for _ in range(rounds):
        for v, model in models.items():
            s = model.spec
            kv = KVCache(s.num_layers, -(-context // BLOCK), BLOCK, s.num_kv_heads, s.head_dim,
                         model.dtype, torch.device("cpu"))
            with torch.inference_mode():
                turns[v].append(_ms(functools.partial(model.forward, kv=kv), fb, reps))
    out: dict[str, Any] = {f"{v}_ms": statistics.median(t) for v, t in turns.items()}
    out["int8_over_bf16_time"] = out["int8_ms"] / out["bf16_ms"]
    out["threads"], out["rounds"], out["context"] = threads, rounds, context
    print("decode step", out, flush=True)
    return out


def _ms(f: Any, x: Any, reps: int = 30) -> float:
    for _ in range(3):
        f(x)
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        f(x)
        ts.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(ts)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--no-quality", action="store_true")
    p.add_argument("--no-speed", action="store_true")
    p.add_argument("--crossover", action="store_true")
    p.add_argument("--decode-step", action="store_true")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    result: dict[str, Any] = json.loads(args.out.read_text()) if args.out.exists() else {}
    result["machine"] = {"threads": args.threads, "torch": torch.__version__,
                         "python": sys.version.split()[0],
                         "avx512_bf16": bool(torch.cpu._is_avx512_bf16_supported())}
    if args.crossover:
        result["crossover"] = crossover(args.threads)
    if args.decode_step:
        result["decode_step"] = decode_step(args.threads)
    if not args.no_quality:
        result["quality"] = quality_all(args.variants, args.threads)
    if not args.no_speed:
        result["speed"] = speed(args.variants, args.threads, args.repeats)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")
    return 0


def quality_all(variants: list[str], threads: int) -> dict[str, Any]:
    from tests.integration.test_default_model_parity import _prompts

    out: dict[str, Any] = {}
    ref: dict[str, Any] | None = None
    for v in variants:
        llm = make_llm(v, threads)
        prompts = _prompts(llm.engine)
        text = ppl_text()
        ids = llm.tokenizer(text)["input_ids"][:PPL_TOKENS]
        if len(ids) < PPL_TOKENS:
            raise RuntimeError(f"perplexity text has {len(ids)} tokens, want {PPL_TOKENS}")
        out.setdefault("text", {"modules": PPL_MODULES, "tokens": len(ids),
                                "sha256": hashlib.sha256(text.encode()).hexdigest()})
        out[v] = quality(v, llm, prompts, ids, ref)
        ref = ref or out[v]
        del llm
    for v in variants:
        out[v].pop("continuations")
    return out


if __name__ == "__main__":
    raise SystemExit(main())
