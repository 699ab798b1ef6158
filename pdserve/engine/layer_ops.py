"""The per-token ops of a decoder layer, behind one seam.

``TorchOps`` is the reference (any device, any dtype). ``CpuKernelOps`` runs the
same maths through pdserve's fused fp32 CPU kernels (``csrc/decode_ops.cpp``):
at decode batch sizes a layer's ~40 small torch ops cost more in dispatch and
thread wake-ups than in arithmetic. It runs our kernel for each op in its ``use``
set and TorchOps for the rest. ``layer_ops(name, ...)`` picks by config name:
``torch`` (torch everywhere), ``cpu`` (every kernel that passed its self-check,
kernel_check.py) or ``auto`` (per op, whichever of ours and torch's is faster on
this machine, kernel_choice.py).
"""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, Protocol

import torch
import torch.nn.functional as F

from pdserve.config import KERNEL_CHOICES
from pdserve.engine import kernel_check, kernel_choice
from pdserve.engine.attention import causal_self_attention, decode_attention
from pdserve.engine.kv_cache import KVCache
from pdserve.engine.rope import RotaryEmbedding

if TYPE_CHECKING:
    from pdserve.engine.model import ForwardBatch

QKV = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


class LayerOps(Protocol):
    def rms_norm(self, x: torch.Tensor, w: torch.Tensor, eps: float,
                 delta: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(x + delta, rms_norm(x + delta) * w); x (N, d)."""
        ...

    def rope_store(self, qkv: torch.Tensor, fb: ForwardBatch, kv: KVCache, layer: int) -> QKV:
        """Rotate q and k of ``qkv`` (N, (H + 2 kvh) hd), write k and v into the pool at
        ``fb.slot_mapping``; return q (N, H, hd), k and v (N, kvh, hd)."""
        ...

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        """SwiGLU: silu(gate) * up of gate_up (N, 2I) -> (N, I)."""
        ...

    def decode_attention(self, q: torch.Tensor, kv: KVCache, layer: int,
                         fb: ForwardBatch, scale: float) -> torch.Tensor:
        """Attention of the D decode rows q (D, H, hd) over their paged K/V: (D, H*hd)."""
        ...


class TorchOps:
    """Any device, any dtype: a step computes in its activations' dtype (the norm
    weights and RoPE tables follow it; the KV pool converts on write and read)."""

    def __init__(self, rope: RotaryEmbedding, num_heads: int, num_kv_heads: int) -> None:
        self.rope, self.num_heads, self.num_kv_heads = rope, num_heads, num_kv_heads
        self._cos_sin: tuple[torch.Tensor, torch.Tensor] | None = None
        self._positions: torch.Tensor | None = None

    def rms_norm(self, x: torch.Tensor, w: torch.Tensor, eps: float,
                 delta: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if delta is not None:
            x = x + delta
        return x, F.rms_norm(x, (x.shape[-1],), w.to(x.dtype), eps)

    def rope_store(self, qkv: torch.Tensor, fb: ForwardBatch, kv: KVCache, layer: int) -> QKV:
        n, h, kvh = qkv.shape[0], self.num_heads, self.num_kv_heads
        hd = qkv.shape[1] // (h + 2 * kvh)
        if self._positions is not fb.positions:  # once per step, not per layer
            cos, sin = self.rope.lookup(fb.positions)
            self._positions, self._cos_sin = fb.positions, (cos.to(qkv.dtype), sin.to(qkv.dtype))
        assert self._cos_sin is not None
        qk = self.rope.apply(qkv[:, : (h + kvh) * hd].view(n, -1, hd), *self._cos_sin)
        q, k = qk[:, :h], qk[:, h:]  # (N, H, hd), (N, kvh, hd)
        v = qkv[:, (h + kvh) * hd :].view(n, kvh, hd)  # (N, kvh, hd)
        kv.write(layer, fb.slot_mapping, k, v)
        return q, k, v

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        gate, up = gate_up.chunk(2, dim=-1)  # (N, I) each
        return F.silu(gate) * up

    def decode_attention(self, q: torch.Tensor, kv: KVCache, layer: int,
                         fb: ForwardBatch, scale: float) -> torch.Tensor:
        tables, lens = fb.decode_block_tables, fb.decode_seq_lens
        assert tables is not None and lens is not None
        keys = torch.arange(tables.shape[1] * kv.block_size, device=tables.device)
        mask = (keys[None, :] < lens[:, None]).view(len(lens), 1, 1, -1)  # True: key exists
        return decode_attention(q, kv.k[layer], kv.v[layer], tables, mask, scale)


# Our kernel behind each op of LayerOps.
KERNEL_OF = {"rms_norm": "rms_norm", "rope_store": "rope_store_kv",
             "decode_attention": "paged_decode_attention", "silu_mul": "silu_mul"}


class CpuKernelOps:
    """fp32 on CPU only; same results as TorchOps up to float summation order."""

    def __init__(self, kernels: Any, rope: RotaryEmbedding, num_heads: int,
                 num_kv_heads: int, use: frozenset[str] = frozenset(KERNEL_OF.values())) -> None:
        self.k, self.rope, self.num_heads, self.num_kv_heads = kernels, rope, num_heads, num_kv_heads
        self.use = use  # kernel names; TorchOps runs the other ops
        self.torch = TorchOps(rope, num_heads, num_kv_heads)

    def rms_norm(self, x: torch.Tensor, w: torch.Tensor, eps: float,
                 delta: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if "rms_norm" not in self.use:
            return self.torch.rms_norm(x, w, eps, delta)
        return x, self.k.rms_norm(x, delta, w, eps)  # adds delta into x in place

    def rope_store(self, qkv: torch.Tensor, fb: ForwardBatch, kv: KVCache, layer: int) -> QKV:
        if "rope_store_kv" not in self.use:
            return self.torch.rope_store(qkv, fb, kv, layer)
        n, h, kvh = qkv.shape[0], self.num_heads, self.num_kv_heads
        hd = qkv.shape[1] // (h + 2 * kvh)
        self.k.rope_store_kv(qkv, fb.positions, self.rope.cos, self.rope.sin, h, kvh,
                             kv.k_slots(layer), kv.v_slots(layer), fb.slot_mapping)
        q = qkv[:, : h * hd].view(n, h, hd)
        k = qkv[:, h * hd : (h + kvh) * hd].view(n, kvh, hd)
        v = qkv[:, (h + kvh) * hd :].view(n, kvh, hd)
        return q, k, v

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        if "silu_mul" not in self.use:
            return self.torch.silu_mul(gate_up)
        return self.k.silu_mul(gate_up)  # type: ignore[no-any-return]

    def decode_attention(self, q: torch.Tensor, kv: KVCache, layer: int,
                         fb: ForwardBatch, scale: float) -> torch.Tensor:
        if "paged_decode_attention" not in self.use:
            return self.torch.decode_attention(q, kv, layer, fb, scale)
        assert fb.decode_block_tables is not None and fb.decode_seq_lens is not None
        out = self.k.paged_decode_attention(q.contiguous(), kv.k[layer], kv.v[layer],
                                            fb.decode_block_tables, fb.decode_seq_lens, scale)
        return out.view(q.shape[0], -1)


def layer_ops(name: str, rope: RotaryEmbedding, num_heads: int, num_kv_heads: int,
              compute: torch.dtype, device: torch.device, hidden_size: int | None = None,
              intermediate_size: int | None = None,
              kv_dtype: torch.dtype = torch.float32) -> LayerOps:
    """``hidden_size``, ``intermediate_size`` (default: heads x head_dim, 4x that) and
    the pool's ``kv_dtype`` are the shapes ``auto`` times each op at."""
    if name not in KERNEL_CHOICES:
        raise ValueError(f"kernels must be one of {KERNEL_CHOICES}, got {name!r}")
    applies = device.type == "cpu" and compute == torch.float32
    kernels = kernel_check.verified() if name != "torch" and applies else None
    if name == "cpu" and kernels is None:
        raise ValueError("kernels: 'cpu' needs a CPU with AVX2, a C++ compiler and "
                         "dtype float32 compute; use 'auto' or 'torch'")
    if kernels is None:
        return TorchOps(rope, num_heads, num_kv_heads)
    use = frozenset(k for k in KERNEL_OF.values() if kernels.has(k))
    ours = CpuKernelOps(kernels.module, rope, num_heads, num_kv_heads, use)
    if name == "auto":
        d = hidden_size or num_heads * 2 * rope.half
        shapes = _Shapes(d, intermediate_size or 4 * d, num_heads, num_kv_heads, 2 * rope.half,
                         kv_dtype)
        ours.use = frozenset(k for k in use if _faster(k, ours, shapes))
    return ours


class _Shapes:
    """One model's op shapes, and the inputs to time each op at batch 1 and 4."""

    ROWS = (1, 4)
    CONTEXT = 256  # tokens each timed decode row attends over

    def __init__(self, d: int, inter: int, heads: int, kv_heads: int, head_dim: int,
                 kv_dtype: torch.dtype = torch.float32) -> None:
        self.d, self.inter, self.heads, self.kv_heads, self.hd = d, inter, heads, kv_heads, head_dim
        blocks = max(self.ROWS) * self.CONTEXT // 16
        self.kv = KVCache(1, blocks, 16, kv_heads, head_dim, kv_dtype, torch.device("cpu"))

    def key(self, kernel: str) -> str:
        """The kernel's name and the shapes its time depends on."""
        heads = f"h={self.heads} kvh={self.kv_heads} hd={self.hd}"
        if self.kv.data.dtype != torch.float32:
            heads += f" kv={str(self.kv.data.dtype).removeprefix('torch.')}"
        return kernel + " " + {"rms_norm": f"d={self.d}", "silu_mul": f"i={self.inter}",
                               "rope_store_kv": heads,
                               "paged_decode_attention": f"{heads} ctx={self.CONTEXT}"}[kernel]

    def batch(self, rows: int) -> Any:
        tables = torch.arange(rows * self.CONTEXT // 16).view(rows, -1)
        lens = torch.full((rows,), self.CONTEXT)
        slots = tables[:, -1] * 16 + 15
        return SimpleNamespace(positions=lens - 1, slot_mapping=slots,
                               decode_block_tables=tables, decode_seq_lens=lens)

    def work(self, kernel: str, ops: LayerOps, rows: int) -> Callable[[], object]:
        fb, kv, hd = self.batch(rows), self.kv, self.hd
        if kernel == "rms_norm":
            x, w, delta = torch.randn(rows, self.d), torch.randn(self.d), torch.zeros(rows, self.d)
            return lambda: ops.rms_norm(x, w, 1e-5, delta)
        if kernel == "rope_store_kv":
            qkv = torch.randn(rows, (self.heads + 2 * self.kv_heads) * hd)
            return lambda: ops.rope_store(qkv, fb, kv, 0)
        if kernel == "paged_decode_attention":
            q = torch.randn(rows, self.heads, hd)
            return lambda: ops.decode_attention(q, kv, 0, fb, hd**-0.5)
        gate_up = torch.randn(rows, 2 * self.inter)
        return lambda: ops.silu_mul(gate_up)


def _faster(kernel: str, ours: CpuKernelOps, shapes: _Shapes) -> bool:
    """Whether our ``kernel`` beats torch's ops at these shapes (timed once, cached)."""
    return kernel_choice.prefer_ours(
        shapes.key(kernel), [shapes.work(kernel, ours, n) for n in shapes.ROWS],
        [shapes.work(kernel, ours.torch, n) for n in shapes.ROWS])


CausalKernel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float], torch.Tensor]


def causal_prefill_kernel(name: str, device: torch.device, wide_dtype: torch.dtype,
                          num_heads: int, num_kv_heads: int, head_dim: int,
                          ) -> CausalKernel | None:
    """Our bf16 attention for a wide step's first chunks (q (L, H, 64), k and v
    (L, kvh, 64) -> (L, H*64)), where it applies (a CPU whose wide steps run bf16, an
    AVX-512 BF16 build that passed its self-check, head dim 64) and ``name`` allows it:
    ``cpu`` always, ``auto`` where it beats torch's tiled kernel at 512 tokens (timed
    once, cached)."""
    if name == "torch" or device.type != "cpu" or wide_dtype != torch.bfloat16 \
            or head_dim != 64:
        return None
    checked = kernel_check.verified()
    if checked is None or not checked.has("causal_attention_bf16"):
        return None
    kernel: CausalKernel = checked.module.causal_attention_bf16
    if name == "auto":
        qkv = torch.randn(512, num_heads + 2 * num_kv_heads, head_dim).to(torch.bfloat16)
        q, k, v = qkv[:, :num_heads], qkv[:, num_heads:-num_kv_heads], qkv[:, -num_kv_heads:]
        heads = f"h={num_heads} kvh={num_kv_heads} hd={head_dim} n=512"
        if not kernel_choice.prefer_ours(
                f"causal_attention_bf16 {heads}", [lambda: kernel(q, k, v, 0.125)],
                [lambda: causal_self_attention(q, k, v, 0.125)]):
            return None
    return kernel
