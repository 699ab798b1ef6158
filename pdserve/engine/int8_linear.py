"""int8 weight-only quantization, per group of GROUP input values (quantization="int8").

Every weight row is cut into groups of GROUP (32) consecutive input values; each
(row, group) gets an fp16 scale s and zero z, and w ≈ s * q + z with q int8. Per
group the quantizer keeps whichever of two grids is closer to the weights:

- asymmetric: 256 levels from the group's min to its max (z = min + 128 s). GGUF's
  Q4_1 blocks (32 values d * j + m, j in 0..15) land on every 17th level exactly;
- symmetric (z = 0, s = max|w| / 127): GGUF's Q8_0 blocks (d * j, |j| <= 127, e.g.
  SmolLM2's embedding) land on it exactly.

So a model that came from such a GGUF gets back the values it was built from (up to
the fp16 rounding of s and z), which is what makes its greedy output agree with the
same model in bf16 (bench/quant_quality.py). Scales are stored times 2^shift (one
power of two per tensor, undone on the output) so that small groups stay in fp16's
normal range.

Small batches (M <= INT8_SMALL_BATCH, CPU kernels present, chosen) run
csrc/int8_gemv.cpp on exact fp32 activations; larger ones, and any other device,
dequantize into a scratch buffer shared by the model and run a GEMM.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from pdserve.engine import kernel_check, kernel_choice

GROUP = 32  # input values per scale/zero: GGUF's block size (Q4_0/Q4_1/Q8_0)
# Rows up to which the int8 kernel runs instead of dequantize-then-GEMM (the kernel is
# ahead of fp32 GEMM up to M = 128 on this project's AVX2 box; 64 leaves a margin for
# CPUs whose GEMM is faster, where the kernel still runs AVX2 code).
INT8_SMALL_BATCH = 64
# The large-batch path dequantizes at most this many weights at a time into the
# model's scratch buffer (bounds the scratch for a large LM head: 16 MiB in fp32).
_SCRATCH_ELEMS = 4 * 2**20
_ROWS, _CHUNK = 6, 16  # the packed block of csrc/int8_gemv.cpp: 6 rows x 16 K values
_FP16_TOP = 2.0**14  # largest |s| or |z| after the shift: well inside fp16 (65504)


def _require_quantizable(w: torch.Tensor, name: str) -> None:
    if w.dim() != 2 or w.numel() == 0:
        raise ValueError(f"quantization: int8 needs a non-empty 2-D weight, but {name} has "
                         f"shape {tuple(w.shape)}")
    if not w.is_floating_point():
        raise ValueError(f"quantization: int8 needs a float weight, but {name} is {w.dtype}")
    if w.shape[1] % GROUP:
        raise ValueError(f"quantization: int8 quantizes groups of {GROUP} input values, but "
                         f"{name} has {w.shape[1]} inputs (shape {tuple(w.shape)})")
    if not bool(torch.isfinite(w).all()):
        raise ValueError(f"quantization: {name} has non-finite values (inf or nan); "
                         "int8 scales need finite weights")


def _grid(wg: torch.Tensor, s: torch.Tensor, z: torch.Tensor, lo: int, hi: int,
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, squared error per group) of ``wg`` (N, G, GROUP) on the grid s * q + z."""
    safe = torch.where(s != 0, s, torch.ones_like(s))
    q = torch.round((wg - z) / safe).clamp_(lo, hi)
    q = torch.where(s != 0, q, torch.zeros_like(q))
    return q, (q * s + z - wg).square_().sum(-1, keepdim=True)


def quantize_int8(w: torch.Tensor, name: str
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """(q int8 (N, K), scales fp16 (N, K/GROUP), zeros fp16 (N, K/GROUP), shift):
    w[n, k] ≈ (q[n, k] * scales[n, g] + zeros[n, g]) * 2^-shift, g = k // GROUP.

    ValueError naming ``quantization`` and the weight when it cannot be quantized.
    """
    _require_quantizable(w, name)
    n, k = w.shape
    wg = w.detach().float().reshape(n, k // GROUP, GROUP)  # (N, G, GROUP)
    lo, hi = wg.amin(-1, keepdim=True), wg.amax(-1, keepdim=True)
    top = float(torch.maximum(lo.abs().amax(), hi.abs().amax()))
    shift = 0 if top == 0 else int(math.floor(math.log2(_FP16_TOP / top)))
    shift = max(-64, min(64, shift))  # 2^-shift stays a normal fp32 number
    wg = wg * 2.0**shift  # exact: a power of two
    lo, hi = lo * 2.0**shift, hi * 2.0**shift

    def fp16(t: torch.Tensor) -> torch.Tensor:  # what the kernel will read back
        return t.half().float()

    s_a = fp16((hi - lo) / 255)
    z_a = fp16(lo + 128 * s_a)
    q_a, err_a = _grid(wg, s_a, z_a, -128, 127)
    s_s = fp16(torch.maximum(lo.abs(), hi.abs()) / 127)
    q_s, err_s = _grid(wg, s_s, torch.zeros_like(s_s), -127, 127)
    sym = err_s <= err_a  # (N, G, 1)
    q = torch.where(sym, q_s, q_a).to(torch.int8).reshape(n, k)
    scales = torch.where(sym, s_s, s_a)[..., 0].half()
    zeros = torch.where(sym, torch.zeros_like(z_a), z_a)[..., 0].half()
    return q, scales, zeros, shift


def dequantize_int8(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                    shift: int) -> torch.Tensor:
    """fp32 (N, K): the weights an int8 layer multiplies by (the reference of tests)."""
    n, k = q.shape
    w = q.float().view(n, -1, GROUP) * scales.float()[..., None] + zeros.float()[..., None]
    return w.view(n, k) * 2.0**-shift


def pack_int8(q: torch.Tensor) -> torch.Tensor:
    """int8 (N, K) -> (ceil(N / 6), K / 16, 6, 16), rows zero-padded: the layout
    csrc/int8_gemv.cpp streams (6 rows interleaved 16 values at a time)."""
    n, k = q.shape
    padded = torch.zeros(-(-n // _ROWS) * _ROWS, k, dtype=torch.int8, device=q.device)
    padded[:n] = q
    blocks, chunks = padded.shape[0] // _ROWS, k // _CHUNK
    return padded.view(blocks, _ROWS, chunks, _CHUNK).permute(0, 2, 1, 3).contiguous()


def pack_scales(scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    """fp16 (N, G) twice -> (ceil(N / 6), G, 12) fp16: per block and group the 6 rows'
    scales, then their zeros (padded rows 0), what the kernel reads beside a group."""
    n, g = scales.shape
    rows = -(-n // _ROWS) * _ROWS
    sz = torch.zeros(rows, g, 2, dtype=torch.float16, device=scales.device)
    sz[:n, :, 0], sz[:n, :, 1] = scales, zeros
    return sz.view(rows // _ROWS, _ROWS, g, 2).permute(0, 2, 3, 1).reshape(
        rows // _ROWS, g, 2 * _ROWS).contiguous()


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
    """y = x · dequant(q)ᵀ (+ b): int8 weights with an fp16 scale and zero per group.

    Same call interface as ``linear.Linear``. For C++ callers (a fused decode layer):
      ``qweight``: int8 (ceil(N/6), K/16, 6, 16), contiguous (see ``pack_int8``);
      ``scales``:  fp16 (ceil(N/6), K/32, 12), contiguous (see ``pack_scales``);
      ``unscale``: 2^-shift, multiplies every output;
      ``out_features`` N, ``in_features`` K; ``bias``: (N,) compute dtype or None.
    ``kernels``: ``torch`` (never the kernel), ``cpu`` (the kernel wherever it passed
    its self-check) or ``auto`` (there, only if it is faster than dequantize + GEMM).
    """

    __slots__ = ("qweight", "scales", "unscale", "bias", "out_features", "in_features",
                 "_compute", "_scratch", "_kernel")

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, compute: torch.dtype,
                 scratch: DequantScratch | None = None, name: str = "weight",
                 kernels: str = "auto") -> None:
        q, scales, zeros, shift = quantize_int8(weight, name)
        self.out_features, self.in_features = q.shape
        self.qweight, self.scales = pack_int8(q), pack_scales(scales, zeros)
        self.unscale = 2.0**-shift
        self.bias = None if bias is None else bias.to(compute)
        self._compute = compute
        self._scratch = scratch or DequantScratch()
        self._kernel: Callable[..., torch.Tensor] | None = None
        checked = kernel_check.verified() if weight.is_cpu and kernels != "torch" else None
        if checked is not None and checked.has("linear_int8w_packed"):
            self._kernel = checked.module.linear_int8w_packed
            if kernels == "auto" and not self._faster():
                self._kernel = None

    def _faster(self) -> bool:
        xs = [torch.randn(rows, self.in_features).to(self._compute) for rows in (1, 4)]
        ours = [functools.partial(self._small_batch, x) for x in xs]
        theirs = [functools.partial(self._large_batch, x) for x in xs]
        op = f"linear_int8w_packed n={self.out_features} k={self.in_features}"
        return kernel_choice.prefer_ours(op, ours, theirs)

    @property
    def read_bytes(self) -> int:
        return self.qweight.numel() + self.scales.numel() * self.scales.element_size()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self._kernel is not None and x.shape[0] <= INT8_SMALL_BATCH:
            y = self._small_batch(x)
        else:
            y = self._large_batch(x)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def _small_batch(self, x: torch.Tensor) -> torch.Tensor:
        assert self._kernel is not None
        y: torch.Tensor = self._kernel(x.float(), self.qweight, self.scales, self.out_features,
                                       self.unscale)
        return y.to(x.dtype)

    def _large_batch(self, x: torch.Tensor) -> torch.Tensor:  # (M, K) -> (M, N)
        blocks, chunks = self.qweight.shape[:2]
        groups = self.scales.shape[1]
        per_part = max(1, _SCRATCH_ELEMS // (_ROWS * chunks * _CHUNK))
        parts = []
        for b0 in range(0, blocks, per_part):
            part = self.qweight[b0:b0 + per_part]  # (b, C, 6, 16)
            b = part.shape[0]
            w = self._scratch.take(b * _ROWS * self.in_features, self._compute, x.device)
            w.view(b, _ROWS, chunks, _CHUNK).copy_(part.permute(0, 2, 1, 3))  # unpack, widen
            sz = self.scales[b0:b0 + per_part].view(b, groups, 2, _ROWS).permute(0, 2, 3, 1)
            sz = sz.to(self._compute)[..., None] * self.unscale  # (b, 2, 6, G, 1)
            wg = w.view(b, _ROWS, groups, GROUP)
            wg.mul_(sz[:, 0]).add_(sz[:, 1])
            rows = min(b * _ROWS, self.out_features - b0 * _ROWS)
            wq = w.view(b * _ROWS, self.in_features)[:rows]
            # A wide step on a native-bf16 CPU multiplies in bf16: dequantized exactly
            # in the compute dtype, rounded once.
            parts.append(F.linear(x, wq if wq.dtype == x.dtype else wq.to(x.dtype)))
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
