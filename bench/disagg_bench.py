"""W5, the KV hand-off: does the transfer hide behind prefill compute?

Starts a disaggregated cluster (prefill on CPU 0, decode on CPU 1, one thread
each), sends one request at a time of 256, 1024 and 2048 random prompt tokens
with 1 output token, per KV encoding, and reports TTFT, the prefill compute time
measured inside the prefill worker, the exposed rest (TTFT − compute) and the
bytes on the wire. In the same run it measures the wire alone (bench/wire_bench.py):
a raw loopback TCP socket against pdserve's KV stream, sender and receiver in
two processes doing the workers' real per-chunk work.
"""

from __future__ import annotations

import os
import socket
import statistics
from typing import Any

from bench.progress import Progress, QuietProgress
from bench.wire_bench import wire_throughput
from bench.workloads import random_prompts
from pdserve.client import Client
from pdserve.cluster_config import ClusterConfig, Member
from pdserve.process_launcher import start, stop

SIZES = (256, 1024, 2048)
ENCODINGS = {"model": 0, "bf16": 2, "fp16": 3, "int8": 4}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_w5(model: str | None, dtype: str, repeats: int, vocab: int,
           progress: Progress | None = None) -> dict[str, Any]:
    two = len(os.sched_getaffinity(0)) >= 2
    # Every (encoding, size) repeat sends the same prompt: the prefix cache is off, or
    # every repeat after the first would hand off 4 tokens instead of the prompt.
    c = ClusterConfig(model=model, dtype=dtype, router_port=_free_port(), http_port=0,
                      policy="load_aware", local_prefill_below=1, enable_prefix_caching=False,
                      prefill=[Member(_free_port(), 0, (0,) if two else None, 1)],
                      decode=[Member(_free_port(), 0, (1,) if two else None, 1)])
    steps = len(ENCODINGS) * len(SIZES) + 1  # every (encoding, size), then the wire
    with (progress or QuietProgress()).bar("W5: starting the cluster", steps) as bar:
        procs = start(c)
        try:
            client = Client(f"127.0.0.1:{c.router_port}", timeout=600)
            list(client.generate([1, 2, 3, 4], max_tokens=2))  # warm-up
            rows = []
            for enc in ENCODINGS:
                for n in SIZES:
                    bar.show(f"W5 KV hand-off {enc} {n} tokens x{repeats}")
                    rows.append(_measure(client, n, enc, repeats, vocab))
                    bar.advance()
            client.close()
        finally:
            stop(procs)
        bar.show(f"W5 wire alone x{repeats}")
        wire = wire_throughput(repeats)  # same run, cluster stopped
        bar.advance()
    return {"requests": rows, "wire": wire}


def _measure(client: Client, n: int, enc: str, repeats: int, vocab: int) -> dict[str, Any]:
    prompt = random_prompts(1, n, vocab, seed=5)[0]
    samples = []
    for _ in range(repeats):
        last = None
        for d in client.generate(prompt, max_tokens=1, ignore_eos=True,
                                 kv_encoding=ENCODINGS[enc]):
            last = d
        assert last is not None and last.timings["plan"] == "remote"
        samples.append(last.timings)
    ttft = statistics.median(t["ttft_s"] for t in samples)
    compute = statistics.median(t["prefill_compute_s"] for t in samples)
    kv_bytes = samples[0]["kv_bytes"]
    return {"prompt_tokens": n, "encoding": enc, "ttft_s": ttft, "prefill_compute_s": compute,
            "exposed_s": ttft - compute, "exposed_share": (ttft - compute) / ttft,
            "kv_bytes": kv_bytes, "bytes_per_token": kv_bytes / n}
