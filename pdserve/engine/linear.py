"""Linear layers and the dtype plan of a model on a given device.

``dtype`` is what weights are stored as. Where the hardware has no native bf16
(CPUs without AVX512-BF16/AMX) a bf16 matmul is emulated and runs several times
slower than fp32, so there we *compute* in fp32: small batches (decode) read the
bf16 weights through our kernel (kernel_check.py; its AVX-512 BF16 build serves fp32
compute over bf16 weights wherever it is chosen), which halves the bytes a memory-bound
step reads; big batches (prefill) run fp32 GEMM on an fp32 copy of the same
bf16-rounded values, so both paths multiply by identical weights.

``Int8Linear`` (quantization="int8") stores symmetric int8 weights with one fp32
scale per output channel instead: a quarter of fp32's bytes, half of bf16's.
``linear_factory`` picks one of them for every matmul of a model.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Protocol

import torch
import torch.nn.functional as F

from pdserve.config import QUANTIZATIONS
from pdserve.engine import kernel_check, kernel_choice

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


# int8 weight-only quantization (EngineConfig.quantization = "int8").
# Rows up to which the int8 kernel runs instead of dequantize-then-GEMM. On this AVX2
# box (bench/quant_quality.py --crossover, one thread, SmolLM2's gate|up) the kernel
# is ahead of fp32 GEMM up to M = 128 and level at 512; 64 leaves a margin for CPUs
# whose GEMM is faster (AVX-512, AMX), where the kernel still runs AVX2 code.
INT8_SMALL_BATCH = 64
# Whether the LM head is quantized too (chosen by measurement: bench/quant_quality.py).
INT8_LM_HEAD = True
# The large-batch path dequantizes at most this many weights at a time into the
# model's scratch buffer (bounds the scratch for a large LM head: 16 MiB in fp32).
_SCRATCH_ELEMS = 4 * 2**20
_ROWS, _CHUNK = 6, 16  # the packed block of csrc/int8_gemv.cpp: 6 rows x 16 K values


def quantize_int8(w: torch.Tensor, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8: (q int8 (N, K), scales fp32 (N,)), w ≈ q * s.

    ValueError naming ``quantization`` and the weight when it cannot be quantized.
    """
    if w.dim() != 2 or w.numel() == 0:
        raise ValueError(f"quantization: int8 needs a non-empty 2-D weight, but {name} has "
                         f"shape {tuple(w.shape)}")
    if not w.is_floating_point():
        raise ValueError(f"quantization: int8 needs a float weight, but {name} is {w.dtype}")
    w32 = w.float()
    if not bool(torch.isfinite(w32).all()):
        raise ValueError(f"quantization: {name} has non-finite values (inf or nan); "
                         "int8 scales need finite weights")
    scales = w32.abs().amax(dim=1) / 127.0
    scales = torch.where(scales > 0, scales, torch.ones_like(scales))  # an all-zero row
    q = torch.round(w32 / scales[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scales.contiguous()


def pack_int8(q: torch.Tensor) -> torch.Tensor:
    """int8 (N, K) -> (ceil(N / 6), ceil(K / 16), 6, 16), zero-padded: the layout
    csrc/int8_gemv.cpp streams (6 rows interleaved 16 values at a time)."""
    n, k = q.shape
    padded = torch.zeros(-(-n // _ROWS) * _ROWS, -(-k // _CHUNK) * _CHUNK, dtype=torch.int8,
                         device=q.device)
    padded[:n, :k] = q
    blocks, chunks = padded.shape[0] // _ROWS, padded.shape[1] // _CHUNK
    return padded.view(blocks, _ROWS, chunks, _CHUNK).permute(0, 2, 1, 3).contiguous()


class DequantScratch:
    """One reused buffer per model into which the large-batch path dequantizes a
    layer's weights (no persistent full-precision copy: the point is memory)."""

    def __init__(self) -> None:
        self._buf: torch.Tensor | None = None

    def take(self, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        buf = self._buf
        if buf is None or buf.numel() < numel or buf.dtype != dtype or buf.device != device:
            buf = self._buf = torch.empty(numel, dtype=dtype, device=device)
        return buf[:numel]


class Int8Linear:
    """y = (x · qᵀ) * scales (+ b): int8 weights, one fp32 scale per output channel.

    Same call interface as ``Linear``. Small batches (M <= INT8_SMALL_BATCH, CPU with
    the kernels) run csrc/int8_gemv.cpp on exact fp32 activations; larger ones (or any
    other device: the torch fallback) dequantize into the shared scratch and GEMM.

    For C++ callers (e.g. a fused decode layer), the weights are:
      ``qweight``: int8 (ceil(N/6), Kp/16, 6, 16), contiguous (see ``pack_int8``;
                   Kp = K rounded up to 16, padding is zero);
      ``scales``:  fp32 (N,), contiguous: w[n, k] ≈ q[n, k] * scales[n];
      ``out_features`` N, ``in_features`` K; ``bias``: (N,) compute dtype or None.
    """

    __slots__ = ("qweight", "scales", "bias", "out_features", "in_features", "_compute",
                 "_scales_c", "_scratch", "_kernel")

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, compute: torch.dtype,
                 scratch: DequantScratch | None = None, name: str = "weight",
                 kernels: str = "auto") -> None:
        q, self.scales = quantize_int8(weight, name)
        self.out_features, self.in_features = q.shape
        self.qweight = pack_int8(q)
        self.bias = None if bias is None else bias.to(compute)
        self._compute = compute
        self._scales_c = self.scales.to(compute)
        self._scratch = scratch or DequantScratch()
        checked = kernel_check.verified() if weight.is_cpu and kernels != "torch" else None
        self._kernel = (checked.module.linear_int8w_packed
                        if checked is not None and checked.has("linear_int8w_packed") else None)

    @property
    def read_bytes(self) -> int:
        return self.qweight.numel() + 4 * self.scales.numel()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self._kernel is not None and x.shape[0] <= INT8_SMALL_BATCH:
            y = self._small_batch(x)
        else:
            y = self._large_batch(x)
        return y if self.bias is None else y + self.bias

    def _small_batch(self, x: torch.Tensor) -> torch.Tensor:
        assert self._kernel is not None
        xf = x.float()
        padded_k = self.qweight.shape[1] * _CHUNK
        if padded_k != self.in_features:
            xf = F.pad(xf, (0, padded_k - self.in_features))
        y: torch.Tensor = self._kernel(xf, self.qweight, self.scales, self.out_features)
        return y.to(self._compute)

    def _large_batch(self, x: torch.Tensor) -> torch.Tensor:
        blocks, chunks = self.qweight.shape[:2]
        per_part = max(1, _SCRATCH_ELEMS // (_ROWS * chunks * _CHUNK))
        parts = []
        for b0 in range(0, blocks, per_part):
            part = self.qweight[b0:b0 + per_part]  # (b, C, 6, 16)
            b = part.shape[0]
            w = self._scratch.take(b * _ROWS * chunks * _CHUNK, self._compute, x.device)
            w = w.view(b, _ROWS, chunks, _CHUNK)
            w.copy_(part.permute(0, 2, 1, 3))  # unpack and widen in one pass
            rows = min(b * _ROWS, self.out_features - b0 * _ROWS)
            parts.append(F.linear(x, w.view(b * _ROWS, chunks * _CHUNK)[:rows, :self.in_features]))
        y = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
        return y.mul_(self._scales_c)


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
