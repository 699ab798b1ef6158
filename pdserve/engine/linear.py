"""Linear layers and the dtype plan of a model on a given device.

``dtype`` is what weights are stored as. Where the hardware has no native bf16
(CPUs without AVX512-BF16/AMX) a bf16 matmul is emulated and runs several times
slower than fp32, so there we *compute* in fp32: small batches (decode) read the
bf16 weights through a small AVX2 kernel, which halves the bytes a memory-bound
step reads; big batches (prefill) run fp32 GEMM on an fp32 copy of the same
bf16-rounded values, so both paths multiply by identical weights.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

SMALL_BATCH = 8  # rows up to which the bf16 kernel beats fp32 GEMM on the upcast copy
_kernel: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None
_kernel_tried = False


def native_low_precision(device: torch.device) -> bool:
    if device.type == "cuda":
        return True
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def compute_dtype_for(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    if dtype == torch.float32 or native_low_precision(device):
        return dtype
    return torch.float32


def bf16_kernel() -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None:
    """The compiled AVX2 bf16-weight kernel (built once into the cache), or None."""
    global _kernel, _kernel_tried
    if _kernel_tried:
        return _kernel
    _kernel_tried = True
    if not torch.cpu._is_avx2_supported():
        return None
    from pdserve.engine.model_loader import cache_root

    build = cache_root() / "ext" / f"torch-{torch.__version__}"
    build.mkdir(parents=True, exist_ok=True)
    src = Path(__file__).with_name("csrc") / "bf16_gemv.cpp"
    try:
        from torch.utils.cpp_extension import load

        # -fopenmp: at::parallel_for is a header template; without it the kernel
        # silently runs on one thread.
        mod = load(name="pdserve_bf16", sources=[str(src)], build_directory=str(build),
                   extra_cflags=["-O3", "-mavx2", "-mfma", "-fopenmp"],
                   extra_ldflags=["-fopenmp"], verbose=False)
        _kernel = mod.linear_bf16w
    except Exception as e:  # no compiler / ninja: fall back to fp32 GEMM everywhere
        log.warning("bf16 weight kernel unavailable (%s); using fp32 matmuls", e)
    return _kernel


class Linear:
    """y = x · wᵀ (+ b) with weights stored in ``dtype`` and computed in ``compute``."""

    __slots__ = ("weight", "bias", "_bf16", "_kernel")

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None,
                 dtype: torch.dtype, compute: torch.dtype) -> None:
        stored = weight.to(dtype)
        # (N, K) in the compute dtype; for emulated bf16, the bf16-rounded values.
        self.weight = stored.to(compute).contiguous()
        self.bias = None if bias is None else bias.to(dtype).to(compute)
        self._bf16 = stored.contiguous() if stored.dtype != compute else None
        self._kernel = bf16_kernel() if self._bf16 is not None and stored.is_cpu else None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self._kernel is not None and x.shape[0] <= SMALL_BATCH:
            assert self._bf16 is not None
            y = self._kernel(x, self._bf16)
            return y if self.bias is None else y + self.bias
        return F.linear(x, self.weight, self.bias)
