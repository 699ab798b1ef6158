"""The per-token ops of a wide step (bf16 activations, a CPU with native bf16).

A wide step (more than ``small_batch`` rows: prefill chunks, batched decode) runs in
bf16 end to end (linear.py's plan). Through torch's ops its rms_norm, SwiGLU and RoPE
are a dozen memory-bound passes over (N, d) and (N, 2I) bf16 tensors per layer (~30%
of a 2,048-token prefill's time on an AMX Xeon); ``WideCpuOps`` runs each as one
fused pass (``csrc/wide_ops.cpp``), rounding to bf16 where torch rounds, so results
equal ``TorchOps``' up to fp32 summation order. ``wide_layer_ops`` picks it where it
applies (a CPU, bf16 wide steps, kernels that passed their self-check, ``kernels``
not ``torch``); with ``auto``, per op, only where it beats torch at 256 rows.
"""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

import torch

from pdserve.engine import kernel_check, kernel_choice
from pdserve.engine.kv_cache import KVCache
from pdserve.engine.layer_ops import QKV, LayerOps, TorchOps
from pdserve.engine.rope import RotaryEmbedding

if TYPE_CHECKING:
    from pdserve.engine.model import ForwardBatch

# Our kernel behind each op (decode rows' attention is the small steps' ops', model.py).
WIDE_KERNEL_OF = {"rms_norm": "rms_norm_bf16", "rope_store": "rope_store_kv_bf16",
                  "silu_mul": "silu_mul_bf16"}
_BF16 = torch.bfloat16


class WideCpuOps:
    """bf16 activations on a CPU, an fp32 or bf16 KV pool: our kernel for each op in ``use``,
    TorchOps for the rest (and for any input the kernels do not take)."""

    def __init__(self, kernels: Any, rope: RotaryEmbedding, num_heads: int,
                 num_kv_heads: int, use: frozenset[str] = frozenset(WIDE_KERNEL_OF.values()),
                 ) -> None:
        self.k, self.rope, self.num_heads, self.num_kv_heads = kernels, rope, num_heads, num_kv_heads
        self.use = use  # kernel names
        self.torch = TorchOps(rope, num_heads, num_kv_heads)

    def rms_norm(self, x: torch.Tensor, w: torch.Tensor, eps: float,
                 delta: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if "rms_norm_bf16" not in self.use or not _takes(x) \
                or (delta is not None and not _takes(delta)):
            return self.torch.rms_norm(x, w, eps, delta)
        return x, self.k.rms_norm_bf16(x, delta, w, eps)  # (N, d); adds delta into x

    def rope_store(self, qkv: torch.Tensor, fb: ForwardBatch, kv: KVCache, layer: int) -> QKV:
        if "rope_store_kv_bf16" not in self.use or not _takes(qkv) \
                or kv.data.dtype not in (torch.float32, _BF16) \
                or self.rope.cos.dtype != torch.float32:
            return self.torch.rope_store(qkv, fb, kv, layer)
        n, h, kvh = qkv.shape[0], self.num_heads, self.num_kv_heads
        hd = qkv.shape[1] // (h + 2 * kvh)
        self.k.rope_store_kv_bf16(qkv, fb.positions, self.rope.cos, self.rope.sin, h, kvh,
                                  kv.k_slots(layer), kv.v_slots(layer), fb.slot_mapping)
        q = qkv[:, : h * hd].view(n, h, hd)  # (N, H, hd), rotated in place
        k = qkv[:, h * hd : (h + kvh) * hd].view(n, kvh, hd)  # (N, kvh, hd)
        v = qkv[:, (h + kvh) * hd :].view(n, kvh, hd)
        return q, k, v

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        if "silu_mul_bf16" not in self.use or not _takes(gate_up):
            return self.torch.silu_mul(gate_up)
        return self.k.silu_mul_bf16(gate_up)  # type: ignore[no-any-return]  # (N, I)

    def decode_attention(self, q: torch.Tensor, kv: KVCache, layer: int,
                         fb: ForwardBatch, scale: float) -> torch.Tensor:
        return self.torch.decode_attention(q, kv, layer, fb, scale)


def _takes(t: torch.Tensor) -> bool:
    """Whether the kernels take ``t``: a contiguous (N, width) bf16 CPU tensor."""
    return t.dtype == _BF16 and t.dim() == 2 and t.is_contiguous() and t.device.type == "cpu"


def wide_layer_ops(name: str, rope: RotaryEmbedding, num_heads: int, num_kv_heads: int,
                   wide_dtype: torch.dtype, device: torch.device, hidden_size: int,
                   intermediate_size: int, kv_dtype: torch.dtype = torch.float32) -> LayerOps:
    """The ops of this model's wide steps: WideCpuOps where it applies, else TorchOps."""
    plain = TorchOps(rope, num_heads, num_kv_heads)
    if name == "torch" or device.type != "cpu" or wide_dtype != _BF16:
        return plain
    checked = kernel_check.verified()
    if checked is None:
        return plain
    use = frozenset(k for k in WIDE_KERNEL_OF.values() if checked.has(k))
    ours = WideCpuOps(checked.module, rope, num_heads, num_kv_heads, use)
    if name == "auto":
        shapes = _WideShapes(hidden_size, intermediate_size, num_heads, num_kv_heads,
                             2 * rope.half, kv_dtype)
        ours.use = frozenset(k for k in use if _faster(k, ours, shapes))
    return ours if ours.use else plain


class _WideShapes:
    """One model's op shapes, and the inputs to time each op at ``ROWS`` bf16 rows."""

    ROWS = 256

    def __init__(self, d: int, inter: int, heads: int, kv_heads: int, head_dim: int,
                 kv_dtype: torch.dtype = torch.float32) -> None:
        self.d, self.inter, self.heads, self.kv_heads, self.hd = d, inter, heads, kv_heads, head_dim
        self.kv = KVCache(1, self.ROWS // 16, 16, kv_heads, head_dim, kv_dtype,
                          torch.device("cpu"))

    def key(self, kernel: str) -> str:
        """The kernel's name and the shapes its time depends on."""
        shape = {"rms_norm_bf16": f"d={self.d}", "silu_mul_bf16": f"i={self.inter}",
                 "rope_store_kv_bf16": f"h={self.heads} kvh={self.kv_heads} hd={self.hd}"}
        pool = self.kv.data.dtype
        kv = "" if pool == torch.float32 else f" kv={str(pool).removeprefix('torch.')}"
        return f"{kernel} {shape[kernel]} n={self.ROWS}{kv}"

    def work(self, kernel: str, ops: LayerOps) -> Callable[[], object]:
        n = self.ROWS
        if kernel == "rms_norm_bf16":
            x, w = torch.randn(n, self.d).to(_BF16), torch.randn(self.d)
            delta = torch.zeros(n, self.d, dtype=_BF16)  # x stays x, run after run
            return lambda: ops.rms_norm(x, w, 1e-5, delta)
        if kernel == "rope_store_kv_bf16":
            qkv = torch.randn(n, (self.heads + 2 * self.kv_heads) * self.hd).to(_BF16)
            fb = SimpleNamespace(positions=torch.arange(n), slot_mapping=torch.arange(n))
            return lambda: ops.rope_store(qkv, fb, self.kv, 0)  # type: ignore[arg-type]
        gate_up = torch.randn(n, 2 * self.inter).to(_BF16)
        return lambda: ops.silu_mul(gate_up)


def _faster(kernel: str, ours: WideCpuOps, shapes: _WideShapes) -> bool:
    """Whether our ``kernel`` beats torch's ops at these shapes (timed once, cached)."""
    return kernel_choice.prefer_ours(shapes.key(kernel), [shapes.work(kernel, ours)],
                                     [shapes.work(kernel, ours.torch)])
