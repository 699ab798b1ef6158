"""Times W1-W3 on pdserve's offline engine and on peers, in one run.

Peers run ``bench/peer_offline.py`` in their own interpreter (vLLM lives in a
separate venv), on the same prompts, with the same timing loop.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.workloads import Run

PEER_SCRIPT = Path(__file__).with_name("peer_offline.py")


def time_pdserve(runs: list[Run], repeats: int, dtype: str, threads: int,
                 model: str | None, quantization: str | None = None) -> dict[str, Any]:
    from pdserve import LLM, SamplingParams

    llm = LLM(model=model, dtype=dtype, num_threads=threads, quantization=quantization)
    llm.generate([[1, 2, 3, 4]], SamplingParams(temperature=0, max_tokens=4))  # warm-up
    out: dict[str, Any] = {"backend": "pdserve", "model_dir": str(llm.engine.model_dir),
                           "dtype": dtype, "quantization": quantization,
                           "ceilings": ceilings(llm, threads), "runs": []}
    for run in runs:
        params = SamplingParams(temperature=0, max_tokens=run.max_tokens, ignore_eos=True)
        times, tokens = [], []
        for _ in range(repeats):
            t0 = time.perf_counter()
            res = llm.generate(run.prompts, params)
            times.append(time.perf_counter() - t0)
            tokens.append(sum(len(r.token_ids) for r in res))
        out["runs"].append({"name": run.name, "times_s": times, "output_tokens": tokens})
    return out


def ceilings(llm: Any, threads: int) -> dict[str, float]:
    """This machine's limits, measured now: memory reads and fp32 GEMM, turned into
    the best possible W2 decode rate (read every weight once per token) and W3
    prefill rate (every layer matmul once per token)."""
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(threads)
    x = torch.ones(64 * 2**20)  # 256 MiB
    x.sum()
    t0 = time.perf_counter()
    for _ in range(5):
        x.sum()
    read_gbps = 5 * x.numel() * 4 / (time.perf_counter() - t0) / 1e9
    a, w = torch.randn(512, 576), torch.randn(3072, 576)
    F.linear(a, w)
    t0 = time.perf_counter()
    for _ in range(10):
        F.linear(a, w)
    gflops = 10 * 2 * 512 * 576 * 3072 / (time.perf_counter() - t0) / 1e9
    model = llm.engine.model
    linears = [lin for layer in model.layers for lin in (layer.qkv, layer.o, layer.gate_up,
                                                          layer.down)]
    layer_params = sum(lin.out_features * lin.in_features for lin in linears)
    step_bytes = sum(lin.read_bytes for lin in [*linears, model.lm_head])  # int8 or dtype
    return {"read_GBps": read_gbps, "fp32_gemm_GFLOPs": gflops,
            "W2": read_gbps * 1e9 / step_bytes, "W3": gflops * 1e9 / (2 * layer_params)}


def time_peer(backend: str, python: str, model_dir: str, runs: list[Run], repeats: int,
              dtype: str, threads: int) -> dict[str, Any]:
    spec = {"model": model_dir, "dtype": dtype, "threads": threads, "repeats": repeats,
            "runs": [{"name": r.name, "prompts": r.prompts, "max_tokens": r.max_tokens}
                     for r in runs]}
    with tempfile.TemporaryDirectory() as tmp:
        spec_path, out_path = Path(tmp, "spec.json"), Path(tmp, "out.json")
        spec_path.write_text(json.dumps(spec))
        cmd = [python, str(PEER_SCRIPT), "--backend", backend, "--spec", str(spec_path),
               "--out", str(out_path)]
        proc = subprocess.run(cmd, stdout=sys.stderr, stderr=sys.stderr, check=False)
        if proc.returncode != 0 or not out_path.exists():
            raise RuntimeError(f"peer {backend} failed (exit {proc.returncode}): {' '.join(cmd)}")
        return json.loads(out_path.read_text())  # type: ignore[no-any-return]
