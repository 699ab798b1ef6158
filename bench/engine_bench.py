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

from bench.progress import Progress, QuietProgress
from bench.roofline import engine_ceilings, measure_rates
from bench.workloads import Run

PEER_SCRIPT = Path(__file__).with_name("peer_offline.py")


def time_pdserve(runs: list[Run], repeats: int, dtype: str, threads: int,
                 model: str | None, quantization: str | None = None,
                 progress: Progress | None = None) -> dict[str, Any]:
    from pdserve import LLM, SamplingParams

    steps = 2 + len(runs) * repeats  # the ceilings before and after, every timed run
    with (progress or QuietProgress()).bar("pdserve: loading the model", steps) as bar:
        # Repeats (and W2's TTFT run) reuse their prompts: with the prefix cache on they
        # would skip their prefill, as vLLM's would (peer_offline.py turns it off too).
        llm = LLM(model=model, dtype=dtype, num_threads=threads, quantization=quantization,
                  enable_prefix_caching=False)
        llm.generate([[1, 2, 3, 4]], SamplingParams(temperature=0, max_tokens=4))  # warm-up
        bar.show("pdserve: ceilings (before)")
        rates = [measure_rates(llm.engine, threads)]
        bar.advance()
        out: dict[str, Any] = {"backend": "pdserve", "model_dir": str(llm.engine.model_dir),
                               "dtype": dtype, "quantization": quantization, "runs": []}
        for run in runs:
            params = SamplingParams(temperature=0, max_tokens=run.max_tokens, ignore_eos=True)
            times, tokens = [], []
            for i in range(repeats):
                bar.show(f"pdserve {run.name} repeat {i + 1}/{repeats}")
                t0 = time.perf_counter()
                res = llm.generate(run.prompts, params)
                times.append(time.perf_counter() - t0)
                tokens.append(sum(len(r.token_ids) for r in res))
                bar.advance()
            out["runs"].append({"name": run.name, "times_s": times, "output_tokens": tokens})
        bar.show("pdserve: ceilings (after)")
        rates.append(measure_rates(llm.engine, threads))  # before and after the runs
        bar.advance()
    out["ceilings"] = engine_ceilings(llm.engine, rates, runs)
    return out


def time_peer(backend: str, python: str, model_dir: str, runs: list[Run], repeats: int,
              dtype: str, threads: int, progress: Progress | None = None,
              pdserve_s: float | None = None) -> dict[str, Any]:
    """``pdserve_s``: pdserve's time on the same runs, shown beside the peer's elapsed
    time (a yardstick, not a forecast: peers run up to 5x slower)."""
    spec = {"model": model_dir, "dtype": dtype, "threads": threads, "repeats": repeats,
            "runs": [{"name": r.name, "prompts": r.prompts, "max_tokens": r.max_tokens}
                     for r in runs]}
    with tempfile.TemporaryDirectory() as tmp:
        spec_path, out_path = Path(tmp, "spec.json"), Path(tmp, "out.json")
        spec_path.write_text(json.dumps(spec))
        cmd = [python, str(PEER_SCRIPT), "--backend", backend, "--spec", str(spec_path),
               "--out", str(out_path)]
        what = f"{backend}: {', '.join(r.name for r in runs)} x{repeats} (its own interpreter"
        what += f"; pdserve took {pdserve_s:.0f} s)" if pdserve_s else ")"
        with (progress or QuietProgress()).bar(what, None) as bar:
            proc = subprocess.Popen(cmd, stdout=sys.stderr, stderr=sys.stderr)
            while _still_running(proc):
                bar.show()  # the elapsed time ticks while the peer works
        if proc.returncode != 0 or not out_path.exists():
            raise RuntimeError(f"peer {backend} failed (exit {proc.returncode}): {' '.join(cmd)}")
        return json.loads(out_path.read_text())  # type: ignore[no-any-return]


def _still_running(proc: subprocess.Popen[bytes]) -> bool:
    try:
        proc.wait(timeout=1.0)
    except subprocess.TimeoutExpired:
        return True
    return False
