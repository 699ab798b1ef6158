#!/usr/bin/env python3
"""Offline throughput/latency runner for a *peer* engine (vLLM or plain transformers).

Standalone on purpose: it imports only the standard library and the backend library,
and is run with the peer's own interpreter (e.g. /work/vllm-venv/bin/python), never
with pdserve's environment.

    python bench/peer_offline.py --backend vllm|transformers --spec SPEC.json --out OUT.json

SPEC.json:
    {"model": "/path/to/hf_dir", "dtype": "bfloat16", "threads": 2, "repeats": 3,
     "runs": [{"name": "W1", "prompts": [[1, 2, 3], ...], "max_tokens": 128}, ...]}

Optional spec keys: "max_model_len" (4096), "enforce_eager" (false),
"prefix_caching" (false: repeats must not hit vLLM's prefix cache),
"kv_cache_gib" (4, vLLM CPU KV-cache size), "warmup_tokens" (4).

OUT.json ("complete" is false while runs are still to come; rewritten after each run):
    {"backend": "vllm", "version": "0.32.0", "load_s": 190.0, "complete": true,
     "runs": [{"name": "W1", "times_s": [...], "output_tokens": [...], "prompt_tokens": N}]}

Every run: greedy (temperature 0), exactly max_tokens per prompt (ignore_eos /
min_new_tokens), all prompts of a run in a single generate call, prompts passed as
token ids.  Each repetition is timed with time.perf_counter around the generate call.
"""

import argparse
import json
import os
import sys
import time

WARMUP_PROMPT = [1, 504, 3458, 282, 4649, 314, 1, 504]  # arbitrary in-vocab ids


def _log(msg):
    print(f"[peer_offline] {msg}", file=sys.stderr, flush=True)


def _cpu_ids(threads):
    try:
        ids = sorted(os.sched_getaffinity(0))
    except AttributeError:  # non-Linux
        ids = list(range(os.cpu_count() or 1))
    return ids[: max(1, threads)]


# --------------------------------------------------------------------------- vLLM
class VllmRunner:
    def __init__(self, spec):
        threads = int(spec.get("threads", 2))
        cpus = _cpu_ids(threads)
        # vLLM's CPU backend reads these at engine start-up.  Only defaults: anything
        # already in the environment wins.
        #  * KV cache: the CPU backend sizes it from VLLM_CPU_KVCACHE_SPACE (GiB).
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(int(spec.get("kv_cache_gib", 4))))
        #  * Thread binding: the default "auto" keeps one core per worker back for the
        #    engine-core/scheduler process, i.e. on a 2-core box the model would run on
        #    ONE OpenMP thread.  Bind the worker to all `threads` cores explicitly and
        #    reserve none.
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", ",".join(str(c) for c in cpus))
        os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
        os.environ.setdefault("OMP_NUM_THREADS", str(len(cpus)))
        # no usage-stats phone-home (no internet anyway)
        os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
        os.environ.setdefault("DO_NOT_TRACK", "1")

        import vllm
        from vllm import LLM, SamplingParams

        try:
            import torch

            torch.set_num_threads(len(cpus))
        except Exception:  # pragma: no cover - torch always ships with vllm
            pass

        self.version = vllm.__version__
        self.SamplingParams = SamplingParams
        try:
            from vllm.inputs import TokensPrompt

            self.make_prompt = lambda ids: TokensPrompt(prompt_token_ids=list(ids))
        except ImportError:  # older layouts
            self.make_prompt = lambda ids: {"prompt_token_ids": list(ids)}

        kwargs = dict(
            model=spec["model"],
            dtype=spec.get("dtype", "bfloat16"),
            gpu_memory_utilization=float(spec.get("gpu_memory_utilization", 0.5)),
            max_model_len=int(spec.get("max_model_len", 4096)),
            # Repeats re-send identical prompts (and W2/W2ttft share one): with the
            # prefix cache on, every repeat after the first would skip its prefill.
            enable_prefix_caching=bool(spec.get("prefix_caching", False)),
            seed=0,
        )
        if spec.get("enforce_eager"):
            kwargs["enforce_eager"] = True
        _log(
            "vLLM %s, env: %s"
            % (
                self.version,
                {k: os.environ.get(k) for k in (
                    "VLLM_CPU_KVCACHE_SPACE", "VLLM_CPU_OMP_THREADS_BIND",
                    "VLLM_CPU_NUM_OF_RESERVED_CPU", "OMP_NUM_THREADS")},
            )
        )
        self.llm = LLM(**kwargs)

    def generate(self, prompts, max_tokens):
        sp = self.SamplingParams(temperature=0.0, max_tokens=int(max_tokens), ignore_eos=True)
        batch = [self.make_prompt(p) for p in prompts]
        t0 = time.perf_counter()
        outs = self.llm.generate(batch, sp, use_tqdm=False)
        dt = time.perf_counter() - t0
        n_out = sum(len(o.outputs[0].token_ids) for o in outs)
        return dt, n_out


# ------------------------------------------------------------------- transformers
class TransformersRunner:
    def __init__(self, spec):
        threads = int(spec.get("threads", 2))
        os.environ.setdefault("OMP_NUM_THREADS", str(threads))
        import torch
        import transformers
        from transformers import AutoModelForCausalLM

        torch.set_num_threads(threads)
        self.torch = torch
        self.version = transformers.__version__
        dtype = getattr(torch, spec.get("dtype", "bfloat16"))
        try:
            model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=dtype)
        except TypeError:  # transformers < 4.56 only knows torch_dtype
            model = AutoModelForCausalLM.from_pretrained(spec["model"], torch_dtype=dtype)
        model.train(False)  # inference mode
        gc = model.generation_config
        pad = gc.pad_token_id if gc.pad_token_id is not None else model.config.pad_token_id
        if pad is None:
            eos = gc.eos_token_id if gc.eos_token_id is not None else model.config.eos_token_id
            pad = eos[0] if isinstance(eos, (list, tuple)) else eos
        if pad is None:
            pad = 0
        self.pad = int(pad)
        self.model = model
        _log("transformers %s, torch %s, threads %d" % (self.version, torch.__version__, threads))

    def generate(self, prompts, max_tokens):
        torch = self.torch
        n = int(max_tokens)
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, p in enumerate(prompts):  # left padding
            if p:
                ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
                mask[i, width - len(p):] = 1
        with torch.inference_mode():
            t0 = time.perf_counter()
            out = self.model.generate(
                ids,
                attention_mask=mask,
                max_new_tokens=n,
                min_new_tokens=n,
                do_sample=False,
                pad_token_id=self.pad,
                temperature=None,
                top_p=None,
                top_k=None,
            )
            dt = time.perf_counter() - t0
        n_out = int(out.shape[0]) * (int(out.shape[1]) - width)
        return dt, n_out


# --------------------------------------------------------------------------- main
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backend", required=True, choices=["vllm", "transformers"])
    ap.add_argument("--spec", required=True, help="spec JSON file")
    ap.add_argument("--out", required=True, help="result JSON file")
    args = ap.parse_args(argv)

    with open(args.spec) as f:
        spec = json.load(f)
    repeats = int(spec.get("repeats", 3))

    t_load = time.perf_counter()
    runner = VllmRunner(spec) if args.backend == "vllm" else TransformersRunner(spec)
    load_s = time.perf_counter() - t_load
    _log("engine ready in %.1fs" % load_s)

    dt, n = runner.generate([WARMUP_PROMPT], int(spec.get("warmup_tokens", 4)))
    _log("warm-up: %d tokens in %.3fs" % (n, dt))

    results = []
    for run in spec["runs"]:
        prompts = [list(map(int, p)) for p in run["prompts"]]
        max_tokens = int(run["max_tokens"])
        times, outs = [], []
        for r in range(repeats):
            dt, n = runner.generate(prompts, max_tokens)
            times.append(dt)
            outs.append(n)
            _log("%s rep %d: %d prompts, %d output tokens, %.3fs (%.1f tok/s)"
                 % (run["name"], r, len(prompts), n, dt, n / dt if dt > 0 else 0.0))
        results.append({
            "name": run["name"],
            "times_s": times,
            "output_tokens": outs,
            "prompt_tokens": sum(len(p) for p in prompts),
        })
        # written after every run, so a run killed part-way still leaves its finished runs
        _write(args.out, {"backend": args.backend, "version": runner.version,
                          "load_s": load_s, "complete": False, "runs": results})

    _write(args.out, {"backend": args.backend, "version": runner.version,
                      "load_s": load_s, "complete": True, "runs": results})
    _log("wrote %s" % args.out)
    return 0


def _write(path, obj):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


if __name__ == "__main__":
    sys.exit(main())
