"""The per-token ops of a decoder layer, behind one seam.

``TorchOps`` is the reference (any device, any dtype). ``CpuKernelOps`` runs the
same maths through pdserve's fused fp32 CPU kernels (``csrc/decode_ops.cpp``):
at decode batch sizes a layer's ~40 small torch ops cost more in dispatch and
thread wake-ups than in arithmetic. ``layer_ops(name, ...)`` picks one by config
name: ``auto`` (kernels where they apply), ``torch`` or ``cpu``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

import torch
import torch.nn.functional as F

from pdserve.config import KERNEL_CHOICES
from pdserve.engine import cpu_kernels
from pdserve.engine.attention import decode_attention
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
    def __init__(self, rope: RotaryEmbedding, num_heads: int, num_kv_heads: int) -> None:
        self.rope, self.num_heads, self.num_kv_heads = rope, num_heads, num_kv_heads
        self._cos_sin: tuple[torch.Tensor, torch.Tensor] | None = None
        self._positions: torch.Tensor | None = None

    def rms_norm(self, x: torch.Tensor, w: torch.Tensor, eps: float,
                 delta: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if delta is not None:
            x = x + delta
        return x, F.rms_norm(x, (x.shape[-1],), w, eps)

    def rope_store(self, qkv: torch.Tensor, fb: ForwardBatch, kv: KVCache, layer: int) -> QKV:
        n, h, kvh = qkv.shape[0], self.num_heads, self.num_kv_heads
        hd = qkv.shape[1] // (h + 2 * kvh)
        if self._positions is not fb.positions:  # once per step, not per layer
            self._positions, self._cos_sin = fb.positions, self.rope.lookup(fb.positions)
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


class CpuKernelOps:
    """fp32 on CPU only; same results as TorchOps up to float summation order."""

    def __init__(self, kernels: Any, rope: RotaryEmbedding, num_heads: int,
                 num_kv_heads: int) -> None:
        self.k, self.rope, self.num_heads, self.num_kv_heads = kernels, rope, num_heads, num_kv_heads

    def rms_norm(self, x: torch.Tensor, w: torch.Tensor, eps: float,
                 delta: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        return x, self.k.rms_norm(x, delta, w, eps)  # adds delta into x in place

    def rope_store(self, qkv: torch.Tensor, fb: ForwardBatch, kv: KVCache, layer: int) -> QKV:
        n, h, kvh = qkv.shape[0], self.num_heads, self.num_kv_heads
        hd = qkv.shape[1] // (h + 2 * kvh)
        self.k.rope_store_kv(qkv, fb.positions, self.rope.cos, self.rope.sin, h, kvh,
                             kv.k_slots(layer), kv.v_slots(layer), fb.slot_mapping)
        q = qkv[:, : h * hd].view(n, h, hd)
        k = qkv[:, h * hd : (h + kvh) * hd].view(n, kvh, hd)
        v = qkv[:, (h + kvh) * hd :].view(n, kvh, hd)
        return q, k, v

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        return self.k.silu_mul(gate_up)  # type: ignore[no-any-return]

    def decode_attention(self, q: torch.Tensor, kv: KVCache, layer: int,
                         fb: ForwardBatch, scale: float) -> torch.Tensor:
        assert fb.decode_block_tables is not None and fb.decode_seq_lens is not None
        out = self.k.paged_decode_attention(q.contiguous(), kv.k[layer], kv.v[layer],
                                            fb.decode_block_tables, fb.decode_seq_lens, scale)
        return out.view(q.shape[0], -1)


def layer_ops(name: str, rope: RotaryEmbedding, num_heads: int, num_kv_heads: int,
              compute: torch.dtype, device: torch.device) -> LayerOps:
    if name not in KERNEL_CHOICES:
        raise ValueError(f"kernels must be one of {KERNEL_CHOICES}, got {name!r}")
    applies = device.type == "cpu" and compute == torch.float32
    kernels = cpu_kernels.load() if name != "torch" and applies else None
    if name == "cpu" and kernels is None:
        raise ValueError("kernels: 'cpu' needs a CPU with AVX2, a C++ compiler and "
                         "dtype float32 compute; use 'auto' or 'torch'")
    if kernels is None:
        return TorchOps(rope, num_heads, num_kv_heads)
    return CpuKernelOps(kernels, rope, num_heads, num_kv_heads)
