"""Linear layers and the dtype plan of a model on a given device.

``dtype`` is what weights are stored as. Where the hardware has no native bf16
(CPUs without AVX512-BF16/AMX) a bf16 matmul is emulated and runs several times
slower than fp32, so there we *compute* in fp32: small batches (decode) read the
bf16 weights through our kernel (kernel_check.py; its AVX-512 BF16 build serves fp32
compute over bf16 weights wherever it is chosen), which halves the bytes a memory-bound
step reads; big batches (prefill) run fp32 GEMM on an fp32 copy of the same
bf16-rounded values, so both paths multiply by identical weights.

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

# Rows up to which the bf16 kernel beats fp32 GEMM on the upcast copy (it widens each
# weight vector once for up to 4 rows; measured on this project's 2-core AVX2 box).
SMALL_BATCH = 32


def native_low_precision(device: torch.device) -> bool:
    if device.type == "cuda":
        return True
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def compute_dtype_for(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    if dtype == torch.float32 or native_low_precision(device):
        return dtype
    return torch.float32


class Linear:
    """y = x · wᵀ (+ b) with weights stored in ``dtype`` and computed in ``compute``.

    ``kernels`` as in layer_ops: ``torch``, ``cpu`` (our bf16 kernel where it applies
    and passed its self-check) or ``auto`` (ours only where it is faster at this shape).
    """

    __slots__ = ("weight", "bias", "_bf16", "_kernel")
    # _bf16 is the stored weight our kernel reads (packed where K % 16 == 0), or None.

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None,
                 dtype: torch.dtype, compute: torch.dtype, kernels: str = "auto") -> None:
        stored = weight.to(dtype)
        # (N, K) in the compute dtype; for emulated bf16, the bf16-rounded values.
        self.weight = stored.to(compute).contiguous()
        self.bias = None if bias is None else bias.to(dtype).to(compute)
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
                w: torch.Tensor) -> bool:
        xs = [torch.randn(rows, self.weight.shape[1]) for rows in (1, 4)]
        ours = [functools.partial(kernel, x, w) for x in xs]
        theirs = [functools.partial(F.linear, x, self.weight) for x in xs]
        return kernel_choice.prefer_ours(op, ours, theirs)

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
        if self._kernel is not None and x.shape[0] <= SMALL_BATCH:
            assert self._bf16 is not None
            y = self._kernel(x, self._bf16)
            return y if self.bias is None else y + self.bias
        return F.linear(x, self.weight, self.bias)


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
                   kernels: str = "auto") -> Callable[..., LinearLayer]:
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
        return Linear(weight, bias, dtype, compute, kernels)

    return make
