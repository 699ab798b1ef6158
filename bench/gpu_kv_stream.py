"""The cloud-prefill / local-decode split on one GPU machine, measured: a prefill worker
process on CUDA, a decode worker process on the CPUs, real gRPC between them, and a
client asking the decode worker for remote-prefilled requests.

What is exposed of the KV stream is what the user waits for beyond the prefill
itself: TTFT at the decode worker minus the prefill worker's own compute time (the
first forward step to the first token, which the stream reports). Each layer's KV
leaves the GPU while the next layer computes (pdserve/engine/kv_staging.py), so the
exposed part is the last layers' copies, the wire, and the decode worker's checks
and writes of the last chunks.
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from pdserve._proto.pdserve.v1 import common_pb2, worker_pb2, worker_pb2_grpc
from pdserve.launch import wait_serving

LENGTHS = (2048, 8192)
ENCODINGS: dict[str, Any] = {"bf16 (model)": common_pb2.KV_ENCODING_UNSPECIFIED,
                             "int8": common_pb2.KV_ENCODING_INT8}
REPEATS = 3
DECODE_PORT = 50971


@dataclass(frozen=True)
class PrefillVariant:
    """One prefill worker the decode worker is pointed at, in turn."""

    name: str
    device: str
    port: int
    lengths: tuple[int, ...] = LENGTHS
    encodings: tuple[str, ...] = tuple(ENCODINGS)
    switch_interval_s: float | None = None
    """Python's GIL switch interval in the prefill worker (None: Python's 5 ms); its
    engine thread launches kernels while the event loop encodes and sends."""


VARIANTS = (
    PrefillVariant("gpu", "cuda", 50961),
    PrefillVariant("gpu, GIL switch 0.5 ms", "cuda", 50962, switch_interval_s=0.0005),
    PrefillVariant("cpu prefill (baseline)", "cpu", 50963, lengths=(2048,),
                   encodings=("bf16 (model)",)),
)


def _worker(role: str, model: Path, port: int, device: str, slot: int, log: Path,
            switch_interval_s: float | None = None) -> subprocess.Popen[bytes]:
    # One machine, prefill slot 0 on the GPU, decode slot 1 on the CPUs outside the
    # GPU's NUMA node (pdserve/placement.py); torch ops on the CPU side, so no native
    # kernels are compiled on the lent machine.
    args = ["--model", str(model), "--device", device, "--dtype", "bfloat16",
            "--port", str(port), "--slot", str(slot), "--slots", "2", "--gpu-workers", "1",
            "--kernels", "torch", "--kv-cache-gb", "2", "--log-format", "json"]
    module = f"{role}_worker"
    launch = ["-m", module] if switch_interval_s is None else [
        "-c", f"import runpy, sys; sys.setswitchinterval({switch_interval_s}); "
              f"runpy.run_module({module!r}, run_name='__main__', alter_sys=True)"]
    return subprocess.Popen([sys.executable, *launch, *args], stdout=log.open("wb"),
                            stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})


async def _one(stub: Any, prompt: list[int], encoding: Any, prefill: str,
               rid: str) -> dict[str, float]:
    params = common_pb2.SamplingParams(max_tokens=2, temperature=0, ignore_eos=True)
    req = worker_pb2.DecodeRequest(request_id=rid, prompt_token_ids=prompt, params=params,
                                   prefill_address=prefill, encoding=encoding)
    t0 = time.perf_counter()
    first: worker_pb2.DecodeResponse | None = None
    ttft = 0.0
    async for msg in stub.Generate(req, timeout=120):
        if first is None:
            first, ttft = msg, time.perf_counter() - t0
    assert first is not None and first.kv_bytes > 0, "the KV did not cross (local prefill?)"
    return {"ttft_s": ttft, "prefill_compute_s": first.prefill_compute_s,
            "kv_transfer_s": first.kv_transfer_s, "kv_bytes": float(first.kv_bytes)}


async def _measure(variant: PrefillVariant, vocab: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    prefill = f"127.0.0.1:{variant.port}"
    async with grpc.aio.insecure_channel(f"127.0.0.1:{DECODE_PORT}") as ch:
        stub = worker_pb2_grpc.DecodeWorkerStub(ch)
        for n in variant.lengths:
            prompt = [3 + (i * 7919) % (vocab - 3) for i in range(n)]
            for name in variant.encodings:
                enc = ENCODINGS[name]
                runs = [await _one(stub, prompt, enc, prefill, f"{variant.port}-{n}-{enc}-{i}")
                        for i in range(1 + REPEATS)]
                out[f"{n} tokens, {name}"] = _summary(runs[1:])  # the first warms up
    return out
def _summary(runs: list[dict[str, float]]) -> dict[str, float]:
    med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    exposed = med["ttft_s"] - med["prefill_compute_s"]
    return {**med, "exposed_s": exposed, "exposed_share_of_ttft": exposed / med["ttft_s"],
            "wire_gbps": med["kv_bytes"] / med["kv_transfer_s"] / 1e9
            if med["kv_transfer_s"] > 0 else 0.0}


def _placements(log: Path) -> list[dict[str, Any]]:
    found = []
    for line in log.read_text(errors="replace").splitlines():
        if '"placement"' in line:
            try:
                found.append(json.loads(line)["placement"])
            except (ValueError, KeyError):
                continue
    return found


def measure_kv_stream(model: Path, work: Path,
                      variants: tuple[PrefillVariant, ...] = VARIANTS) -> dict[str, Any]:
    """One decode worker for the whole run; each variant's prefill worker in turn."""
    from transformers import AutoConfig

    vocab = AutoConfig.from_pretrained(model).vocab_size
    decode_log = work / "decode.log"
    decode = _worker("decode", model, DECODE_PORT, "cpu", 1, decode_log)
    out: dict[str, Any] = {"placement": {}, "runs": {}}
    try:
        wait_serving(f"127.0.0.1:{DECODE_PORT}", 180, [decode])
        for i, v in enumerate(variants):
            log = work / f"prefill-{i}.log"
            prefill = _worker("prefill", model, v.port, v.device, 0, log, v.switch_interval_s)
            try:
                wait_serving(f"127.0.0.1:{v.port}", 180, [decode, prefill])
                out["runs"][v.name] = asyncio.run(_measure(v, vocab))
            finally:
                _stop(prefill)
            out["placement"][f"prefill ({v.name})"] = _placements(log)
    finally:
        _stop(decode)
    out["placement"]["decode"] = _placements(decode_log)
    return out


def _stop(p: subprocess.Popen[bytes]) -> None:
    p.terminate()
    try:
        p.wait(15)
    except subprocess.TimeoutExpired:
        p.kill()
