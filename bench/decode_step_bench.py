"""Decode step time of the default model: the native per-layer call vs the per-op path.

``python -m bench.decode_step_bench [--dtype bfloat16] [--context 72]``: batch 1 and 4,
1 and 2 threads; both paths run interleaved in one process on one KV pool, so their
ratio holds under whatever else the machine is doing (quote the ratio, not the times).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from pdserve import LLM
from pdserve.engine.kv_cache import KVCache
from pdserve.engine.model import ForwardBatch, LlamaModel

BLOCK = 16


def _decode_batch(rows: int, context: int) -> ForwardBatch:
    nb = -(-context // BLOCK)
    tables = torch.arange(rows * nb).view(rows, nb)
    lens = torch.full((rows,), context)
    pos = lens - 1
    return ForwardBatch(torch.full((rows,), 100), pos, tables[:, -1] * BLOCK + pos % BLOCK, rows,
                        tables, lens, [], torch.arange(rows))


def _times(model: LlamaModel, fb: ForwardBatch, kv: KVCache, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t = time.perf_counter()
        model.forward(fb, kv)
        out.append(time.perf_counter() - t)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--context", type=int, default=72)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    model = LLM(dtype=args.dtype).engine.model
    native = model.decode_kernel
    if native is None:
        raise SystemExit("the native decode call does not apply here (see decode_layer.py)")
    s = model.spec
    blocks = 4 * -(-args.context // BLOCK)
    kv = KVCache(s.num_layers, blocks, BLOCK, s.num_kv_heads, s.head_dim, model.dtype,
                 torch.device("cpu"))
    for threads in (1, 2):
        torch.set_num_threads(threads)
        for rows in (1, 4):
            fb = _decode_batch(rows, args.context)
            per_op: list[float] = []
            fused: list[float] = []
            for _ in range(args.rounds):  # interleaved: both paths see the same load
                model.decode_kernel = None
                per_op += _times(model, fb, kv, 6)[1:]
                model.decode_kernel = native
                fused += _times(model, fb, kv, 6)[1:]
            a, b = statistics.median(per_op) * 1e3, statistics.median(fused) * 1e3
            print(f"threads={threads} batch={rows}: per-op {a:7.2f} ms  native {b:7.2f} ms  "
                  f"ratio {a / b:.2f}x  (best {min(per_op) * 1e3:.2f} / {min(fused) * 1e3:.2f})",
                  flush=True)


if __name__ == "__main__":
    main()
