"""What mTLS costs a single stream: W2-like requests (256-token prompt, 256 greedy
output tokens, remote prefill so the KV crosses decode <- prefill) through two
clusters started side by side by the process launcher, one plaintext, one with
``certs`` (every hop mTLS). Requests alternate between the clusters (one at a time,
so the idle one costs nothing but health probes) and the medians are compared.

    python -m bench.tls_overhead [--repeats 5] [--model DIR] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.workloads import random_prompts
from pdserve.certs import write_certs
from pdserve.client import Client
from pdserve.cluster_config import ClusterConfig, Member
from pdserve.config import TLSConfig
from pdserve.process_launcher import start, stop

PROMPT_TOKENS, OUTPUT_TOKENS = 256, 256


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _cluster(model: str | None, certs: str | None) -> ClusterConfig:
    return ClusterConfig(model=model, launcher="process", pin="off", http_port=0,
                         router_port=_free_port(), local_prefill_below=1, certs=certs,
                         prefill=[Member(_free_port(), 0, None, 1)],
                         decode=[Member(_free_port(), 0, None, 1)])


def _one(address: str, tls: TLSConfig | None, prompt: list[int]) -> dict[str, float]:
    client = Client(address, timeout=600, tls=tls)
    try:
        t0 = time.perf_counter()
        first = 0.0
        n = 0
        last = None
        for d in client.generate(prompt, max_tokens=OUTPUT_TOKENS, ignore_eos=True):
            if d.token_ids and not first:
                first = time.perf_counter() - t0
            n += len(d.token_ids)
            last = d
        e2e = time.perf_counter() - t0
    finally:
        client.close()
    assert n == OUTPUT_TOKENS and last is not None and last.timings["plan"] == "remote"
    if not last.timings["kv_bytes"]:  # the decode worker fell back to a local prefill
        raise RuntimeError(f"{address}: the KV did not cross from the prefill worker")
    return {"ttft_ms": 1e3 * first, "tpot_ms": 1e3 * (e2e - first) / (n - 1),
            "kv_transfer_ms": 1e3 * float(last.timings["kv_transfer_s"])}


def _summary(rows: list[dict[str, float]]) -> dict[str, float]:
    return {k: statistics.median(r[k] for r in rows) for k in rows[0]}


def measure(model: str | None, repeats: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as d:
        certs = write_certs(Path(d) / "pki")
        clusters = {"plaintext": _cluster(model, None), "mtls": _cluster(model, str(certs.directory))}
        procs = {name: start(c) for name, c in clusters.items()}
        try:
            prompt = random_prompts(1, PROMPT_TOKENS, 49152 if model is None else 256, 2)[0]
            rows: dict[str, list[dict[str, float]]] = {name: [] for name in clusters}
            for i in range(repeats + 1):  # the first round warms both clusters up
                for name, c in clusters.items():
                    row = _one(f"127.0.0.1:{c.router_port}", c.tls("client"),
                               [*prompt[1:], i])  # a new prompt each time: no cache reuse
                    if i:
                        rows[name].append(row)
        finally:
            for p in procs.values():
                stop(p)
    out: dict[str, Any] = {name: _summary(r) for name, r in rows.items()}
    out["decode_tok_s"] = {name: 1e3 / out[name]["tpot_ms"] for name in rows}
    out["mtls_vs_plaintext_decode"] = out["decode_tok_s"]["mtls"] / out["decode_tok_s"]["plaintext"]
    out["raw"] = rows
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.tls_overhead")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--model", default=None, help="HF directory or .gguf (default: SmolLM2)")
    p.add_argument("--json", dest="json_path", default=None)
    args = p.parse_args(argv)
    out = measure(args.model, args.repeats)
    for name in ("plaintext", "mtls"):
        s = out[name]
        print(f"{name:>9}: decode {out['decode_tok_s'][name]:.1f} tok/s "
              f"(TPOT {s['tpot_ms']:.2f} ms), TTFT {s['ttft_ms']:.0f} ms, "
              f"KV transfer {s['kv_transfer_ms']:.1f} ms")
    print(f"mTLS / plaintext decode throughput: {out['mtls_vs_plaintext_decode']:.3f}")
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
