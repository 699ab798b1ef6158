"""The figures of one lent GPU, in one run (``bench/gpu_check.sh`` calls this after the
``gpu`` tests): the GPU's own ceilings, prefill and single-stream decode of pdserve's
CUDA engine against transformers on the same GPU, the exposed time of the GPU → CPU
KV stream between real worker processes, and the DCGM-named NVML gauges.

Models are random-weight Llamas built from configs (no weights travel): the default
model's shape (SmolLM2-135M, context raised to 16k so an 8k prompt fits) and a
Llama-3.2-1B shape. Each section writes into one JSON summary as it finishes, so a
run cut short keeps what it measured; a section that fails records its error.

    python -m bench.gpu_check --out DIR [--budget-s 360]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from bench.gpu_kv_stream import measure_kv_stream
from bench.roofline import EngineCosts
from pdserve.config import EngineConfig
from pdserve.engine.engine import LLMEngine
from pdserve.sampling_params import SamplingParams

SHAPES: dict[str, dict[str, Any]] = {
    "smollm2-135m-shape": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                               num_attention_heads=9, num_key_value_heads=3, vocab_size=49152,
                               max_position_embeddings=16384, rope_theta=100000.0,
                               tie_word_embeddings=True),
    "llama-1b-shape": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                           num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                           max_position_embeddings=16384, rope_theta=500000.0,
                           tie_word_embeddings=True),
}
PREFILL_LENGTHS = (2048, 8192)
DECODE_PROMPT, DECODE_TOKENS = 128, 128
REPEATS = 3


class Summary:
    """The JSON summary, rewritten after every section."""

    def __init__(self, path: Path, budget_s: float) -> None:
        self.path = path
        self.data: dict[str, Any] = {"sections": {}}
        self.deadline = time.monotonic() + budget_s

    def section(self, name: str, fn: Callable[[], Any]) -> Any:
        if time.monotonic() > self.deadline:
            self.data["sections"][name] = {"skipped": "time budget spent"}
            self._write()
            return None
        t0 = time.monotonic()
        try:
            result = fn()
            self.data["sections"][name] = {"seconds": round(time.monotonic() - t0, 1),
                                           "result": result}
        except Exception as e:  # noqa: BLE001 - one section's failure is its own
            traceback.print_exc()
            result = None
            self.data["sections"][name] = {"error": f"{type(e).__name__}: {e}"}
        self._write()
        print(f"[gpu_check] {name}: {json.dumps(self.data['sections'][name])[:600]}", flush=True)
        return result

    def _write(self) -> None:
        self.path.write_text(json.dumps(self.data, indent=2) + "\n")


def cuda_seconds(fn: Callable[[], object], repeats: int = REPEATS, warmup: int = 1) -> float:
    """Median wall seconds of ``fn`` with the GPU drained before and after each call."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def environment() -> dict[str, Any]:
    import transformers

    p = torch.cuda.get_device_properties(0)
    return {"gpu": p.name, "sms": p.multi_processor_count, "memory_gib": round(p.total_memory / 2**30, 1),
            "capability": f"{p.major}.{p.minor}", "torch": torch.__version__,
            "cuda": torch.version.cuda, "transformers": transformers.__version__,
            "python": sys.version.split()[0]}


def ceilings() -> dict[str, float]:
    """bf16 GEMM TFLOP/s (8192³) and HBM GB/s (a read-only sum; a copy, read + write)."""
    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    gemm = cuda_seconds(lambda: a @ b, repeats=10, warmup=3)
    x = torch.empty(2**30, device="cuda", dtype=torch.bfloat16).normal_()  # 2 GiB
    read = cuda_seconds(lambda: x.sum(dtype=torch.float32), repeats=10, warmup=2)
    y = torch.empty_like(x)
    copy = cuda_seconds(lambda: y.copy_(x), repeats=10, warmup=2)
    return {"bf16_tflops": 2 * n**3 / gemm / 1e12, "hbm_read_gbps": x.nbytes / read / 1e9,
            "hbm_copy_gbps": 2 * x.nbytes / copy / 1e9}


def build_model(root: Path, name: str) -> Path:
    """A random-weight Llama of ``SHAPES[name]`` saved as bf16 safetensors + a tokenizer."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from tests.tiny_models import build_tokenizer

    out = root / name
    build_tokenizer(out)  # ids are sent directly; the tokenizer only has to load
    config = LlamaConfig(**SHAPES[name], bos_token_id=1, eos_token_id=2, rms_norm_eps=1e-5)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(out, safe_serialization=True)
    del model
    torch.cuda.empty_cache()
    return out


def _prompt(n: int, vocab: int, seed: int = 0) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (n,), generator=g).tolist()


def _engine(model: Path, budget: int) -> LLMEngine:
    return LLMEngine(EngineConfig(model=str(model), dtype="bfloat16", device="cuda",
                                  max_num_batched_tokens=budget, kv_cache_gb=4.0))


def pdserve_prefill_s(engine: LLMEngine, prompt: list[int]) -> float:
    params = SamplingParams(temperature=0, max_tokens=1, detokenize=False, ignore_eos=True)
    count = iter(range(10**6))

    def once() -> None:
        rid = f"p{next(count)}"
        engine.add_request(rid, prompt, params)
        while engine.has_unfinished_requests:
            engine.step()

    return cuda_seconds(once)


def hf_prefill_s(hf: Any, prompt: list[int]) -> float:
    x = torch.tensor([prompt], device="cuda")
    with torch.inference_mode():
        return cuda_seconds(lambda: hf(x, use_cache=True, logits_to_keep=1))


def prefill(model: Path, ceil: dict[str, float]) -> dict[str, Any]:
    """Prefill tok/s at each length: pdserve in the prefill worker's default 2,048-token
    steps and in one step, transformers in one forward; each as a share of bf16 peak."""
    from transformers import AutoModelForCausalLM

    out: dict[str, Any] = {}
    hf: Any = AutoModelForCausalLM.from_pretrained(model, dtype=torch.bfloat16,
                                                   attn_implementation="sdpa")
    hf = hf.cuda()  # from_pretrained leaves it in inference mode
    for n in PREFILL_LENGTHS:
        row: dict[str, Any] = {}
        for budget in sorted({2048, n}):
            engine = _engine(model, budget)
            costs = EngineCosts(engine)
            prompt = _prompt(n, engine.spec.vocab_size)
            flops = (n * costs.flops_per_token + costs.lm_head_flops
                     + costs.attn_flops_per_pair * n * (n + 1) // 2)
            s = pdserve_prefill_s(engine, prompt)
            row[f"pdserve_step{budget}"] = _rate(n, s, flops, ceil)
            del engine
            torch.cuda.empty_cache()
        row["transformers"] = _rate(n, hf_prefill_s(hf, prompt), flops, ceil)
        best = max(v["tok_s"] for k, v in row.items() if k.startswith("pdserve"))
        row["pdserve_best_over_transformers"] = best / row["transformers"]["tok_s"]
        out[str(n)] = row
    del hf
    torch.cuda.empty_cache()
    return out


def _rate(n: int, seconds: float, flops: float, ceil: dict[str, float]) -> dict[str, float]:
    return {"seconds": seconds, "tok_s": n / seconds,
            "share_of_bf16_peak": flops / seconds / (ceil["bf16_tflops"] * 1e12)}


def decode(model: Path, ceil: dict[str, float]) -> dict[str, Any]:
    """Batch-1 decode tok/s after a 128-token prompt against the HBM read ceiling
    (weight + KV bytes one step reads ÷ the measured read rate), and transformers'."""
    engine = _engine(model, 2048)
    costs = EngineCosts(engine)
    prompt = _prompt(DECODE_PROMPT, engine.spec.vocab_size)
    params = SamplingParams(temperature=0, max_tokens=DECODE_TOKENS, detokenize=False,
                            ignore_eos=True)
    rates = []
    for i in range(1 + REPEATS):  # the first is the warm-up
        engine.add_request(f"d{i}", prompt, params)
        engine.step()  # prefill + the first token
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        while engine.has_unfinished_requests:
            engine.step()
        rates.append((DECODE_TOKENS - 1) / (time.perf_counter() - t0))
    tok_s = statistics.median(rates[1:])
    mean_ctx = DECODE_PROMPT + DECODE_TOKENS // 2
    step_bytes = costs.weight_bytes(1, 1) + costs.kv_bytes_per_token * mean_ctx
    ceiling = ceil["hbm_read_gbps"] * 1e9 / step_bytes
    del engine
    torch.cuda.empty_cache()
    hf_tok_s = _hf_decode_tok_s(model, prompt)
    return {"tok_s": tok_s, "step_bytes": step_bytes, "hbm_ceiling_tok_s": ceiling,
            "share_of_hbm_ceiling": tok_s / ceiling,
            "transformers_tok_s": hf_tok_s, "pdserve_over_transformers": tok_s / hf_tok_s}


def _hf_decode_tok_s(model: Path, prompt: list[int]) -> float:
    """transformers' greedy generate on the same GPU (prefill included, so a lower bound)."""
    from transformers import AutoModelForCausalLM

    hf: Any = AutoModelForCausalLM.from_pretrained(model, dtype=torch.bfloat16)
    hf = hf.cuda()  # from_pretrained leaves it in inference mode
    x = torch.tensor([prompt], device="cuda")
    gen = dict(max_new_tokens=DECODE_TOKENS, min_new_tokens=DECODE_TOKENS, do_sample=False,
               pad_token_id=0)
    with torch.inference_mode():
        s = cuda_seconds(lambda: hf.generate(x, attention_mask=torch.ones_like(x), **gen),
                         repeats=2)
    return DECODE_TOKENS / s


def profile(model: Path, out: Path) -> dict[str, str]:
    """torch.profiler's top ops of one 8,192-token prefill (by GPU time) and of 16
    batch-1 decode steps (by CPU time: where the host, not the GPU, sets the pace)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    engine = _engine(model, 8192)
    prompt = _prompt(8192, engine.spec.vocab_size)
    pdserve_prefill_s(engine, prompt)  # warm
    acts = [ProfilerActivity.CPU, ProfilerActivity.CUDA]
    with torch_profile(activities=acts) as prof:
        pdserve_prefill_s(engine, prompt)
    files = {"prefill": out / "profile_prefill.txt", "decode": out / "profile_decode.txt"}
    files["prefill"].write_text(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25))
    params = SamplingParams(temperature=0, max_tokens=40, detokenize=False, ignore_eos=True)
    engine.add_request("warm", prompt[:128], params)
    for _ in range(20):
        engine.step()
    with torch_profile(activities=acts) as prof:
        for _ in range(16):
            engine.step()
        torch.cuda.synchronize()
    files["decode"].write_text(prof.key_averages().table(sort_by="cpu_time_total", row_limit=25))
    engine.abort("warm")
    engine.step()
    return {k: str(v) for k, v in files.items()}


def nvml_gauges() -> dict[str, Any]:
    """The DCGM-named gauges move: memory used grows by an allocation, utilization is
    above 0 while GEMMs run."""
    from prometheus_client import CollectorRegistry

    from pdserve.gpu_metrics import register_gpu_metrics

    registry = CollectorRegistry()
    if not register_gpu_metrics(registry):
        raise RuntimeError("NVML registered no GPU gauges")

    def read() -> dict[str, float]:
        return {s.name: s.value for m in registry.collect() for s in m.samples
                if s.labels.get("gpu") == "0"}

    idle = read()
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    held = torch.empty(4 * 2**30, dtype=torch.uint8, device="cuda")
    for _ in range(1500):  # ~2 s of queued GEMMs: NVML averages utilization over ~1 s
        a @ a
    time.sleep(1.0)
    busy = read()
    torch.cuda.synchronize()
    del a, held
    torch.cuda.empty_cache()
    moved = {"fb_used_grew_mib": busy["DCGM_FI_DEV_FB_USED"] - idle["DCGM_FI_DEV_FB_USED"],
             "util_busy": busy["DCGM_FI_DEV_GPU_UTIL"]}
    return {"idle": idle, "busy": busy, **moved,
            "moved": moved["fb_used_grew_mib"] > 3 * 1024 and moved["util_busy"] > 0}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--budget-s", type=float, default=360.0,
                   help="sections starting after this many seconds are skipped")
    p.add_argument("--work", type=Path, default=Path("/tmp/pdserve-gpu-check"))
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if not torch.cuda.is_available():
        print("gpu_check: CUDA is not available here", file=sys.stderr)
        return 2
    s = Summary(args.out / "gpu_check.json", args.budget_s)
    s.section("environment", environment)
    ceil = s.section("ceilings", ceilings)
    s.section("nvml_gauges", nvml_gauges)
    small = s.section("build smollm2-135m-shape", lambda: str(build_model(args.work, "smollm2-135m-shape")))
    if small and ceil:
        s.section("kv_stream smollm2-135m-shape", lambda: measure_kv_stream(Path(small), args.work))
        s.section("prefill smollm2-135m-shape", lambda: prefill(Path(small), ceil))
        s.section("decode smollm2-135m-shape", lambda: decode(Path(small), ceil))
    big = s.section("build llama-1b-shape", lambda: str(build_model(args.work, "llama-1b-shape")))
    if big and ceil:
        s.section("prefill llama-1b-shape", lambda: prefill(Path(big), ceil))
        s.section("decode llama-1b-shape", lambda: decode(Path(big), ceil))
        s.section("profile llama-1b-shape", lambda: profile(Path(big), args.out))
    failed = [k for k, v in s.data["sections"].items() if "error" in v]
    print(f"[gpu_check] wrote {s.path}; failed sections: {failed or 'none'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
