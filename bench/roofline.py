"""What the loaded engine must read and compute for W1-W3, and so the fastest it could go.

A run's time is at least, per phase, the larger of (FLOPs / GEMM rate) and
(bytes / read rate) — the roofline. Counts come from the engine as loaded:

- bytes: the tensors each Linear really reads for a batch of that many rows (the
  packed bf16 copy where the AVX2 small-batch kernel runs, the compute-dtype weight
  for GEMMs, ``qweight`` + ``scales`` for an int8 linear), plus the KV of the
  context (every tensor the KV pool holds, per token slot);
- FLOPs: 2·N·K per token per Linear, the logits row(s), and causal attention
  (QKᵀ and P·V: 4·heads·head_dim per query-key pair per layer).

The GEMM rate is the best over the dtypes the engine could compute in (its compute
dtype, its stored dtype, int8 where weights are int8). Counting only what cannot
be avoided keeps every ceiling an upper bound.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from bench.ceilings import Rates, Shape, best_of, measure
from bench.workloads import Run
from pdserve.engine.linear import SMALL_BATCH

PREFILL_ROWS = (512, 2048)  # GEMM rows of a prefill chunk: the decode role's and the default


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def stored_tensors(lin: Any, rows: int) -> list[torch.Tensor]:
    """The tensors ``lin`` reads to multiply ``rows`` activation rows (duck-typed:
    pdserve's Linear, or an int8 linear with ``qweight`` / ``scales``)."""
    bias = [lin.bias] if getattr(lin, "bias", None) is not None else []
    if getattr(lin, "qweight", None) is not None:
        return [lin.qweight, lin.scales, *bias]
    packed = getattr(lin, "_bf16", None)  # Linear's small-batch kernel path, see linear.py
    if packed is not None and getattr(lin, "_kernel", None) is not None and rows <= SMALL_BATCH:
        return [packed, *bias]
    return [lin.weight, *bias]


def read_bytes(lin: Any, rows: int) -> int:
    return sum(t.nbytes for t in stored_tensors(lin, rows))


class EngineCosts:
    """Bytes and FLOPs of one engine's prefill and decode steps."""

    def __init__(self, engine: Any) -> None:
        model, spec = engine.model, engine.model.spec
        self.layer_linears = [lin for layer in model.layers
                              for lin in (layer.qkv, layer.o, layer.gate_up, layer.down)]
        self.lm_head = model.lm_head
        self.kv_bytes_per_token = _kv_bytes_per_token(engine.kv)
        self.flops_per_token = 2 * sum(_numel(lin) for lin in self.layer_linears)
        self.lm_head_flops = 2 * _numel(self.lm_head)  # per logits row
        self.attn_flops_per_pair = 4 * spec.num_heads * spec.head_dim * spec.num_layers
        self.quantized = any(getattr(lin, "qweight", None) is not None
                             for lin in [*self.layer_linears, self.lm_head])
        self.compute_dtype = _name(engine.dtype)
        self.stored_dtype = _name(engine.weight_dtype)

    def weight_bytes(self, rows: int, logits_rows: int) -> int:
        return (sum(read_bytes(lin, rows) for lin in self.layer_linears)
                + read_bytes(self.lm_head, logits_rows))

    def decode_step(self, contexts: Sequence[int]) -> tuple[int, int]:
        """(FLOPs, bytes) of one decode step, one row per sequence, each attending
        over its context (the new token included)."""
        b = len(contexts)
        flops = (b * (self.flops_per_token + self.lm_head_flops)
                 + self.attn_flops_per_pair * sum(contexts))
        return flops, self.weight_bytes(b, b) + self.kv_bytes_per_token * sum(contexts)

    def prefill(self, prompt_lens: Sequence[int]) -> tuple[int, int]:
        """(FLOPs, bytes) of prefilling these prompts (weights read at least once)."""
        tokens, n = sum(prompt_lens), len(prompt_lens)
        pairs = sum(p * (p + 1) // 2 for p in prompt_lens)  # causal
        flops = tokens * self.flops_per_token + n * self.lm_head_flops
        return flops + self.attn_flops_per_pair * pairs, self.weight_bytes(tokens, n)

    def gemm_shapes(self) -> dict[str, Sequence[Shape]]:
        """Which GEMMs to measure: the compute dtype at every distinct layer shape for
        prefill chunks of 512 and 2048 tokens; the stored dtype and int8 (paths the
        engine could take) at the smallest, since they are slow where the CPU lacks them."""
        nk = dict.fromkeys((lin.out_features, lin.in_features) for lin in self.layer_linears)
        shapes = [(m, k, n) for m in PREFILL_ROWS for n, k in nk]
        out: dict[str, Sequence[Shape]] = {self.compute_dtype: shapes}
        small = [min(shapes, key=lambda s: s[0] * s[1] * s[2])]
        if self.stored_dtype != self.compute_dtype:
            out[self.stored_dtype] = small
        if self.quantized:
            out["int8"] = small
        return out


def _numel(lin: Any) -> int:
    """Weights that take part in the maths (a packed int8 layout pads to its blocks)."""
    return int(lin.out_features * lin.in_features)


def _kv_bytes_per_token(kv: Any) -> int:
    """Bytes per token slot of every tensor the KV pool holds (data, and scales if any)."""
    slots = kv.num_blocks * kv.block_size
    return sum(t.nbytes for t in vars(kv).values() if isinstance(t, torch.Tensor)) // slots


def _seconds(flops: int, nbytes: int, gflops: float, gbps: float) -> float:
    return max(flops / (gflops * 1e9), nbytes / (gbps * 1e9))


def workload_ceilings(costs: EngineCosts, rates: Rates,
                      runs: dict[str, Run]) -> dict[str, dict[str, float]]:
    """The best figure each workload in ``runs`` could reach (same units as its headline)."""
    gflops = max(rates.gemm_GFLOPs.values())
    out: dict[str, dict[str, float]] = {}
    for name, run in runs.items():
        lens = [len(p) for p in run.prompts]
        pf, pb = costs.prefill(lens)
        prefill_s = _seconds(pf, pb, gflops, rates.read_GBps)
        steps = [costs.decode_step([n + s for n in lens]) for s in range(1, run.max_tokens)]
        decode_s = sum(_seconds(f, b, gflops, rates.read_GBps) for f, b in steps)
        if name == "W1":
            out[name] = {"output_tok_s": len(lens) * run.max_tokens / (prefill_s + decode_s)}
        elif name == "W2":
            out[name] = {"decode_tok_s": (run.max_tokens - 1) / decode_s,
                         "bytes_per_step_first": steps[0][1], "bytes_per_step_last": steps[-1][1]}
        elif name == "W3":
            out[name] = {"prefill_tok_s": sum(lens) / prefill_s, "prefill_flops": pf}
    return out


def measure_rates(engine: Any, threads: int) -> Rates:
    """This machine's rates now, for the GEMMs this engine could run."""
    return measure(threads, EngineCosts(engine).gemm_shapes())


def engine_ceilings(engine: Any, measured: Sequence[Rates], runs: Sequence[Run]) -> dict[str, Any]:
    """The best of the ``measured`` rates and the ceiling of each workload in ``runs``."""
    costs, rates = EngineCosts(engine), best_of(measured)
    named = {r.name: r for r in runs if r.name in ("W1", "W2", "W3")}
    return {"threads": rates.threads, "measurements": len(measured),
            "read_GBps": rates.read_GBps, "read_by_method": rates.read_by_method,
            "gemm_GFLOPs": rates.gemm_GFLOPs, "kv_bytes_per_token": costs.kv_bytes_per_token,
            "workloads": workload_ceilings(costs, rates, named)}


def ceilings_line(c: dict[str, Any]) -> str:
    """The measured rates behind every share, for the report."""
    reads = ", ".join(f"{k} {v:.1f}" for k, v in c["read_by_method"].items())
    gemm = ", ".join(f"{k} {v:.0f}" for k, v in c["gemm_GFLOPs"].items())
    text = (f"ceilings (measured now, {c['threads']} threads, best of {c['measurements']} "
            f"measurements around the runs): read {c['read_GBps']:.1f} GB/s "
            f"(best of {reads}); GEMM GFLOP/s {gemm} (the engine's best counts)")
    w2 = c["workloads"].get("W2")
    if w2:
        text += (f"; W2 reads {w2['bytes_per_step_first'] / 1e6:.1f}-"
                 f"{w2['bytes_per_step_last'] / 1e6:.1f} MB/step (weights as stored + KV)")
    return text
