"""Linear layers and the dtype plan of a model on a given device.

``dtype`` is what weights are stored as. On CUDA everything computes in it. On a CPU
a step's activations and the KV pool are fp32 (the ``compute`` dtype), so small
batches (decode: memory-bound, one pass over the weights) read the bf16 weights
through our kernel (kernel_check.py; AVX2, or AVX-512 with BF16 dot products), which
halves the bytes a step reads against fp32 weights. Large batches (prefill:
compute-bound) run one GEMM in the ``gemm`` dtype:

- on CPUs with native bf16 (AVX512-BF16, AMX) bf16 itself: a step of more than
  ``SMALL_BATCH_NATIVE`` rows runs in bf16 end to end (model.py), on the stored
  weights, at the GEMM rate oneDNN reaches there;
- elsewhere bf16 GEMM is emulated (several times slower than fp32), so large
  batches run fp32 GEMM on an fp32 copy of the same bf16-rounded values, and the
  kernel serves up to ``SMALL_BATCH`` rows.

Both paths multiply by identical weights.

``Int8Linear`` (quantization="int8", int8_linear.py) stores int8 weights with an
fp16 scale and zero per group of 32 inputs instead: 1.125 bytes a weight, against
bf16's 2. ``linear_factory`` picks one of them for every matmul of a model.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Protocol

import torch
import torch.nn.functional as F

from pdserve.config import QUANTIZATIONS
from pdserve.engine import kernel_check, kernel_choice
from pdserve.engine.int8_linear import DequantScratch, Int8Linear

# Rows up to which the bf16 kernel (it widens each weight vector once for up to 4 rows)
# beats the large-batch GEMM: fp32 GEMM on the upcast copy (measured on this project's
# 2-core AVX2 box), or native bf16 GEMM (AMD EPYC with AVX512-BF16, 2 threads, the
# default model's gate|up 3072x576: ours 107 us vs oneDNN's 140 us at 8 rows, 214 vs
# 176 us at 16).
SMALL_BATCH = 32
SMALL_BATCH_NATIVE = 8


def native_low_precision(device: torch.device) -> bool:
    if device.type == "cuda":
        return True
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def compute_dtype_for(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """Activations of small steps and the KV pool: ``dtype`` on CUDA, fp32 on a CPU."""
    return dtype if device.type == "cuda" else torch.float32


def kv_dtype_for(kv_cache_dtype: str, dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The KV pool's dtype: ``auto`` keeps the weights' bf16 (on a CPU too: the kernels
    widen it as they read, and a decode step's attention reads half the bytes), else
    the compute dtype."""
    if kv_cache_dtype != "auto":
        return getattr(torch, kv_cache_dtype)  # type: ignore[no-any-return]
    return dtype if dtype == torch.bfloat16 else compute_dtype_for(dtype, device)


def gemm_dtype_for(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """What large batches multiply in: ``dtype`` on CUDA; on a CPU bf16 where it is
    native, else fp32."""
    if device.type == "cuda" or (dtype == torch.bfloat16 and native_low_precision(device)):
        return dtype
    return torch.float32


def small_batch_for(compute: torch.dtype, gemm: torch.dtype) -> int:
    """Rows up to which a CPU step runs in ``compute`` through our kernels (the most;
    ``measured_small_batch`` may lower it where bf16 is native)."""
    return SMALL_BATCH if gemm == compute else SMALL_BATCH_NATIVE


def measured_small_batch(lin: Linear, upper: int) -> int:
    """Where bf16 GEMM is native, the rows up to which our kernel (fp32 activations, one
    pass over the weights per few rows) beats the GEMM on ``lin``'s shape, timed once
    per machine (kernel_choice caches it): the crossover differs by CPU. An AMD EPYC
    with AVX512-BF16: 8 rows. An AMX Xeon, gate|up 3072x576, 2 threads: 108 vs 216 us
    at 1 row, 270 vs 210 at 4, 506 vs 209 at 8 (AMX tiles make oneDNN's small GEMMs
    cheap). Powers of two from 2 up to ``upper``; 1 row always runs ours where ``lin``
    chose it."""
    rows = 1
    while rows * 2 <= upper and lin.faster_at(rows * 2):
        rows *= 2
    return rows


class Linear:
    """y = x · wᵀ (+ b) with weights stored in ``dtype``: up to ``small_batch`` fp32 rows
    through our bf16 kernel where it applies, else one GEMM in ``gemm`` (x cast to it
    and back when x comes in another dtype).

    ``kernels`` as in layer_ops: ``torch``, ``cpu`` (our bf16 kernel where it applies
    and passed its self-check) or ``auto`` (ours only where it is faster at this shape).
    """

    __slots__ = ("weight", "bias", "small_batch", "_bf16", "_kernel")
    # _bf16 is the stored weight our kernel reads (packed where K % 16 == 0), or None.

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None,
                 dtype: torch.dtype, compute: torch.dtype, kernels: str = "auto",
                 gemm: torch.dtype | None = None) -> None:
        stored = weight.to(dtype)
        gemm = gemm or compute
        # (N, K) in the GEMM dtype; for emulated bf16, the bf16-rounded values in fp32.
        self.weight = stored.to(gemm).contiguous()
        self.bias = None if bias is None else bias.to(dtype).to(compute)
        self.small_batch = small_batch_for(compute, gemm)
        self._bf16: torch.Tensor | None = None
        self._kernel: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None
        if stored.dtype == torch.bfloat16 and compute == torch.float32 and stored.is_cpu \
                and kernels != "torch":
            self._choose_kernel(stored.contiguous(), auto=kernels == "auto")

    def _choose_kernel(self, stored: torch.Tensor, auto: bool) -> None:
        checked = kernel_check.verified()
        if checked is None:
            return
        k = checked.module
        n, K = stored.shape
        if K % 16 == 0 and checked.has("linear_bf16w_packed"):
            name, w = "linear_bf16w_packed", k.pack_bf16_weight(stored)
            kernel = lambda x, w: k.linear_bf16w_packed(x, w, n)  # noqa: E731
        elif checked.has("linear_bf16w"):
            name, w, kernel = "linear_bf16w", stored, k.linear_bf16w
        else:
            return
        if auto and not self._faster(f"{name} n={n} k={K}", kernel, w):
            return
        self._bf16, self._kernel = w, kernel

    def _faster(self, op: str, kernel: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                w: torch.Tensor, rows: tuple[int, ...] = (1, 4)) -> bool:
        xs = [torch.randn(r, self.weight.shape[1]) for r in rows]
        ours = [functools.partial(kernel, x, w) for x in xs]
        theirs = [functools.partial(self._gemm, x) for x in xs]
        return kernel_choice.prefer_ours(f"{op} gemm={_name(self.weight.dtype)}", ours, theirs)

    def faster_at(self, rows: int) -> bool:
        """Whether our kernel beats the GEMM at ``rows`` rows (False without a kernel)."""
        if self._kernel is None or self._bf16 is None:
            return False
        n, k = self.weight.shape
        return self._faster(f"rows={rows} n={n} k={k}", self._kernel, self._bf16, (rows,))

    @property
    def out_features(self) -> int:
        return int(self.weight.shape[0])

    @property
    def in_features(self) -> int:
        return int(self.weight.shape[1])

    @property
    def read_bytes(self) -> int:
        stored = self.weight if self._bf16 is None else self._bf16
        return stored.numel() * stored.element_size()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self._kernel is not None and x.shape[0] <= self.small_batch:
            assert self._bf16 is not None
            y = self._kernel(x.float(), self._bf16).to(x.dtype)
        else:
            y = self._gemm(x)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def _gemm(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        return F.linear(x, w) if x.dtype == w.dtype else F.linear(x.to(w.dtype), w).to(x.dtype)


class LinearLayer(Protocol):
    """What the model calls: y (M, N) = layer(x (M, K)), in the compute dtype."""

    def __call__(self, x: torch.Tensor) -> torch.Tensor: ...

    @property
    def out_features(self) -> int: ...

    @property
    def in_features(self) -> int: ...

    @property
    def read_bytes(self) -> int:
        """Bytes of weights one small-batch call reads (the decode step's memory traffic)."""
        ...


# Whether the LM head is quantized too under quantization="int8" (chosen by
# measurement: bench/quant_quality.py, bench/results/int8_quality.json).
INT8_LM_HEAD = True


def linear_factory(quantization: str | None, dtype: torch.dtype, compute: torch.dtype,
                   kernels: str = "auto", gemm: torch.dtype | None = None,
                   ) -> Callable[..., LinearLayer]:
    """``make(weight, bias=None, name=..., lm_head=False)`` -> the model's linear layer:
    ``Linear`` in ``dtype``, or ``Int8Linear`` under quantization="int8" (the LM head
    only where INT8_LM_HEAD says so)."""
    if quantization not in (None, *QUANTIZATIONS):
        raise ValueError(f"quantization must be None or one of {QUANTIZATIONS}, "
                         f"got {quantization!r}")
    scratch = DequantScratch()

    def make(weight: torch.Tensor, bias: torch.Tensor | None = None, name: str = "weight",
             lm_head: bool = False) -> LinearLayer:
        if quantization == "int8" and (INT8_LM_HEAD or not lm_head):
            return Int8Linear(weight, bias, compute, scratch, name, kernels)
        return Linear(weight, bias, dtype, compute, kernels, gemm)

    return make


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
