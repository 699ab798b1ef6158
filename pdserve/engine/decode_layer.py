"""A decode-only step with one native call per decoder layer (``csrc/decode_layer.cpp``).

At batch 1 the per-op path (``layer_ops.py`` + ``linear.py``) spends much of a step
in Python and torch dispatch: ~10 kernel calls and dozens of view/alloc ops per
layer. ``DecodeLayerKernel`` runs the whole layer in C++ on preallocated scratch,
through the same inner loops, so its numbers are the per-op path's.

It is chosen once at load (``DecodeLayerKernel.for_model``) and only where every
layer's weights are in a layout the call takes: packed bf16 (``Linear`` with the
bf16 kernel), fp32, or packed int8 (``Int8Linear`` with its kernel); no bias (Qwen2's
qkv bias).
Otherwise, and for any step with prefill rows or more decode rows than the model's
``small_batch``, the model runs the per-op path.

Per step: ``begin(fb)`` -> a ``DecodeStep`` (views of the scratch for this step's
D rows) -> ``layer(i, x, kv)`` for each layer in order, updating x in place.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import torch

from pdserve.engine import kernel_check
from pdserve.engine.int8_linear import Int8Linear
from pdserve.engine.kv_cache import KVCache
from pdserve.engine.layer_ops import CpuKernelOps, LayerOps
from pdserve.engine.linear import Linear
from pdserve.engine.rope import RotaryEmbedding

if TYPE_CHECKING:
    from pdserve.engine.model import ForwardBatch, LayerKVHook, ModelSpec

# The per-op kernels the native call is built from: each must pass its self-check.
NEEDS = frozenset({"linear_bf16w_packed", "rms_norm", "rope_store_kv",
                   "paged_decode_attention", "silu_mul"})


class LayerWeights(Protocol):
    """What a decoder layer holds (model.py's ``_Layer``); the linears of any type."""

    @property
    def in_norm(self) -> torch.Tensor: ...
    @property
    def qkv(self) -> object: ...
    @property
    def o(self) -> object: ...
    @property
    def post_norm(self) -> torch.Tensor: ...
    @property
    def gate_up(self) -> object: ...
    @property
    def down(self) -> object: ...


@dataclass(frozen=True)
class NativeWeight:
    """A linear's weight as the native call takes it: packed bf16, fp32 (N, K), or packed
    int8 with its fp16 scales and zeros and ``unscale`` (int8_linear.py)."""

    weight: torch.Tensor
    scales: torch.Tensor = torch.empty(0)  # int8 only
    unscale: float = 1.0


@dataclass(frozen=True)
class _NativeLayer:
    in_norm: torch.Tensor
    post_norm: torch.Tensor
    linears: tuple[NativeWeight, ...]  # qkv, o, gate_up, down

    def args(self) -> tuple[torch.Tensor, ...]:
        qkv, o, gate_up, down = (lin.weight for lin in self.linears)
        return self.in_norm, qkv, o, self.post_norm, gate_up, down


def native_weight(lin: object) -> NativeWeight | None:
    """``lin``'s weight as the native call takes it, or None."""
    if type(lin) is Int8Linear:
        usable = lin.bias is None and lin._kernel is not None
        return NativeWeight(lin.qweight, lin.scales, lin.unscale) if usable else None
    if type(lin) is not Linear or lin.bias is not None:
        return None
    packed = lin._bf16  # the bf16 kernel's layout, where Linear uses the kernel
    if packed is None:
        w = lin.weight
        usable = w.dtype == torch.float32 and w.is_cpu and w.is_contiguous()
        return NativeWeight(w) if usable else None
    return NativeWeight(packed) if packed.dim() == 4 and lin._kernel is not None else None


def _native_layer(w: LayerWeights) -> _NativeLayer | None:
    mats = [native_weight(lin) for lin in (w.qkv, w.o, w.gate_up, w.down)]
    if any(m is None for m in mats):
        return None
    return _NativeLayer(w.in_norm.contiguous(), w.post_norm.contiguous(),
                        tuple(m for m in mats if m is not None))


class DecodeStep:
    """One decode-only step's scratch views and inputs; ``layer`` runs layer ``i``."""

    def __init__(self, owner: DecodeLayerKernel, fb: ForwardBatch) -> None:
        d = fb.num_decode
        assert fb.decode_block_tables is not None and fb.decode_seq_lens is not None
        self.owner, self.fb, self.rows = owner, fb, d
        self.scratch = [s[:d] for s in owner.scratch]  # h, qkv, attn, gate_up, act, tmp

    def layer(self, i: int, x: torch.Tensor, kv: KVCache,
              on_layer_kv: LayerKVHook | None = None) -> None:
        o, fb, w = self.owner, self.fb, self.owner.layers[i]
        o.kernels.decode_layer(
            x, *self.scratch, *w.args(),
            fb.positions, o.rope.cos, o.rope.sin, kv.k[i], kv.v[i], fb.slot_mapping,
            fb.decode_block_tables, fb.decode_seq_lens, o.num_heads, o.eps, o.scale,
            [lin.scales for lin in w.linears], [lin.unscale for lin in w.linears])
        if on_layer_kv is not None:
            qkv, h, kvh = self.scratch[1], o.num_heads, o.num_kv_heads
            hd = qkv.shape[1] // (h + 2 * kvh)
            k = qkv[:, h * hd : (h + kvh) * hd].view(self.rows, kvh, hd)
            v = qkv[:, (h + kvh) * hd :].view(self.rows, kvh, hd)
            on_layer_kv(i, k, v)


class DecodeLayerKernel:
    """The native per-layer decode call for one model's layers, with its scratch."""

    def __init__(self, kernels: Any, layers: list[_NativeLayer], spec: ModelSpec,
                 rope: RotaryEmbedding, scale: float, max_rows: int) -> None:
        self.kernels, self.layers, self.rope = kernels, layers, rope
        self.max_rows = max_rows
        self.num_heads, self.num_kv_heads = spec.num_heads, spec.num_kv_heads
        self.eps, self.scale = spec.rms_norm_eps, scale
        d, hd, inter = spec.hidden_size, spec.head_dim, spec.intermediate_size
        widths = (d, (spec.num_heads + 2 * spec.num_kv_heads) * hd, spec.num_heads * hd,
                  2 * inter, inter, d)
        # Allocated once for the largest step this path takes; a step uses the first D rows.
        self.scratch = [torch.empty(max_rows, n, dtype=torch.float32) for n in widths]

    @classmethod
    def for_model(cls, ops: LayerOps, layers: Sequence[LayerWeights], spec: ModelSpec,
                  rope: RotaryEmbedding, scale: float, max_rows: int,
                  ) -> DecodeLayerKernel | None:
        """The native path where the per-op path runs pdserve's CPU kernels and every
        layer's weights fit it; None otherwise (the model keeps the per-op path)."""
        if not isinstance(ops, CpuKernelOps) or spec.qkv_bias:
            return None
        checked = kernel_check.verified()
        # The call is built from these per-op kernels: each must have passed its self-check.
        if checked is None or not NEEDS <= checked.ok:
            return None
        kernels = checked.module
        if not hasattr(kernels, "decode_layer"):
            return None
        native = [_native_layer(w) for w in layers]
        if any(n is None for n in native):
            return None
        return cls(kernels, [n for n in native if n is not None], spec, rope, scale, max_rows)

    def applies(self, fb: ForwardBatch) -> bool:
        return not fb.prefills and 0 < fb.num_decode <= self.max_rows

    def begin(self, fb: ForwardBatch) -> DecodeStep:
        return DecodeStep(self, fb)
