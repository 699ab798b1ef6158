"""Linear layers and the dtype plan of a model on a given device.

``dtype`` is what weights are stored as. Where the hardware has no native bf16
(CPUs without AVX512-BF16/AMX) a bf16 matmul is emulated and runs several times
slower than fp32, so there we *compute* in fp32: small batches (decode) read the
bf16 weights through a small AVX2 kernel, which halves the bytes a memory-bound
step reads; big batches (prefill) run fp32 GEMM on an fp32 copy of the same
bf16-rounded values, so both paths multiply by identical weights.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pdserve.engine import cpu_kernels

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
    """y = x · wᵀ (+ b) with weights stored in ``dtype`` and computed in ``compute``."""

    __slots__ = ("weight", "bias", "_bf16", "_kernel")
    # _bf16 is the stored weight in the kernel's packed layout where K % 16 == 0.

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None,
                 dtype: torch.dtype, compute: torch.dtype) -> None:
        stored = weight.to(dtype)
        # (N, K) in the compute dtype; for emulated bf16, the bf16-rounded values.
        self.weight = stored.to(compute).contiguous()
        self.bias = None if bias is None else bias.to(dtype).to(compute)
        self._bf16 = stored.contiguous() if stored.dtype != compute else None
        kernels = cpu_kernels.load() if self._bf16 is not None and stored.is_cpu else None
        self._kernel = None
        if kernels is not None and stored.shape[1] % 16 == 0:
            n = stored.shape[0]
            self._bf16 = kernels.pack_bf16_weight(stored.contiguous())
            self._kernel = lambda x, w: kernels.linear_bf16w_packed(x, w, n)
        elif kernels is not None:
            self._kernel = kernels.linear_bf16w

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self._kernel is not None and x.shape[0] <= SMALL_BATCH:
            assert self._bf16 is not None
            y = self._kernel(x, self._bf16)
            return y if self.bias is None else y + self.bias
        return F.linear(x, self.weight, self.bias)
