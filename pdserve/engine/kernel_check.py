"""Every compiled kernel, checked against its torch reference once per process.

``verified()`` loads the module (cpu_kernels.load) and runs each kernel on small
random inputs against TorchOps / F.linear on the fp32 copy of the same bf16 weights.
A kernel that disagrees beyond fp32 summation-order error, or raises, is dropped
with one warning naming it; the engine then uses torch for that op. This is the
guard for ISA paths no test machine of ours ran (AVX-512 on an AVX2 box, or the
reverse): a wrong kernel costs speed, never tokens.

Lifecycle of one kernel in a process::

    unchecked --check passes--> ok       (kernels=cpu runs it; kernels=auto times it)
    unchecked --check fails---> dropped  (one warning; TorchOps / F.linear run the op)
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F

from pdserve.engine import cpu_kernels
from pdserve.engine.attention import causal_self_attention
from pdserve.engine.cpu_features import detect
from pdserve.engine.kv_cache import KVCache
from pdserve.engine.rope import RotaryEmbedding

log = logging.getLogger(__name__)

KERNEL_NAMES = ("linear_bf16w_packed", "linear_bf16w", "rms_norm", "rope_store_kv",
                "paged_decode_attention", "silu_mul", "linear_int8w_packed",
                "causal_attention_bf16", "rms_norm_bf16", "silu_mul_bf16", "rope_store_kv_bf16")
# Kernels a module has only when built for this ISA level (absent elsewhere, unwarned).
NEEDS_ISA = {"causal_attention_bf16": "avx512bf16"}
_RTOL = _ATOL = 1e-4  # fp32 with another summation order, nothing more
# bf16 kernels round where torch's bf16 ops round: a bf16 ulp (2^-8 relative) where the
# fp32 sum before a rounding differs in its last bit; nothing more.
_BF16_TOL = 1e-2
_H, _KVH, _HD, _BS, _BLOCKS = 4, 2, 20, 4, 32  # hd 20: the non-multiple-of-8 tails too


@dataclass(frozen=True)
class Kernels:
    """The kernel module and the names of the kernels that passed their self-check."""

    module: Any
    ok: frozenset[str]

    def has(self, name: str) -> bool:
        return name in self.ok


_verified: Kernels | None = None
_done = False


def verified() -> Kernels | None:
    """This process's checked kernels; None where the module is unavailable."""
    global _verified, _done
    if not _done:
        module = cpu_kernels.load()
        _verified = None if module is None else check(module)
        _done = True
        if _verified is not None:
            log.info("CPU kernels built for %s on %s: %d of %d passed their self-check",
                     module.compiled_isa(), detect().describe(), len(_verified.ok),
                     len(built_kernels(module)))
    return _verified


def forget() -> None:
    """Check again on the next verified() (tests that swap the module)."""
    global _verified, _done
    _verified, _done = None, False


def built_kernels(module: Any) -> list[str]:
    """The kernels ``module``'s build has (those of other ISA levels left out)."""
    isa = module.compiled_isa()
    return [n for n in KERNEL_NAMES if NEEDS_ISA.get(n, isa) == isa]


def check(module: Any) -> Kernels:
    ok = set()
    for name in built_kernels(module):
        try:
            _CHECKS[name](module, torch.Generator().manual_seed(0))
            ok.add(name)
        except Exception as e:  # AssertionError from assert_close, or the kernel raised
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            log.warning("CPU kernel %s dropped: failed its check against torch (%s); "
                        "torch runs that op",
                        name, reason)
    return Kernels(module, frozenset(ok))


def _close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual, expected, rtol=_RTOL, atol=_ATOL)


def _randn(gen: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=gen)


def _check_linear_packed(m: Any, gen: torch.Generator) -> None:
    w = _randn(gen, 13, 64).to(torch.bfloat16)  # 13: a partly padded last block
    packed = m.pack_bf16_weight(w)
    for rows in (1, 2, 3, 4, 7):  # each batch-row path and a mix of them
        x = _randn(gen, rows, 64)
        _close(m.linear_bf16w_packed(x, packed, 13), F.linear(x, w.float()))


def _check_linear(m: Any, gen: torch.Generator) -> None:
    w = _randn(gen, 7, 40).to(torch.bfloat16)
    for rows in (1, 3):
        x = _randn(gen, rows, 40)
        _close(m.linear_bf16w(x, w), F.linear(x, w.float()))


def _check_linear_int8(m: Any, gen: torch.Generator) -> None:
    from pdserve.engine import int8_linear as i8  # int8_linear imports this module

    w = _randn(gen, 13, 96)  # 13: a partly padded last block; 3 groups of 32
    w[:, 32:64] = w[:, 32:64].abs() + 1.0  # a group off zero: the asymmetric grid
    q, scales, zeros, shift = i8.quantize_int8(w, "self-check")
    packed, sz = i8.pack_int8(q), i8.pack_scales(scales, zeros)
    expected_w = i8.dequantize_int8(q, scales, zeros, shift)
    for rows in (1, 2, 3, 4, 7):  # each batch-row path and a mix of them
        x = _randn(gen, rows, 96)
        _close(m.linear_int8w_packed(x, packed, sz, 13, 2.0**-shift), F.linear(x, expected_w))


def _torch_ops() -> Any:
    from pdserve.engine.layer_ops import TorchOps  # layer_ops imports this module

    config = SimpleNamespace(rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    rope = RotaryEmbedding(config, _HD, 64, torch.float32, torch.device("cpu"))
    return TorchOps(rope, _H, _KVH)


def _check_rms_norm(m: Any, gen: torch.Generator) -> None:
    x, delta, w = _randn(gen, 3, 48), _randn(gen, 3, 48), _randn(gen, 48)
    x_ref, h_ref = _torch_ops().rms_norm(x.clone(), w, 1e-5, delta)
    x_ker = x.clone()
    _close(m.rms_norm(x_ker, delta, w, 1e-5), h_ref)
    _close(x_ker, x_ref)


def _decode_batch(gen: torch.Generator, lens: list[int]) -> Any:
    nb = -(-max(lens) // _BS)
    tables = torch.randperm(_BLOCKS, generator=gen)[: nb * len(lens)].view(len(lens), nb)
    seq_lens = torch.tensor(lens)
    positions = seq_lens - 1
    slots = tables.gather(1, (positions // _BS)[:, None])[:, 0] * _BS + positions % _BS
    return SimpleNamespace(positions=positions, slot_mapping=slots,
                           decode_block_tables=tables, decode_seq_lens=seq_lens)


# The KV pool dtypes the kernels that read or write the pool take.
POOL_DTYPES = (torch.float32, torch.bfloat16)


def _pool(gen: torch.Generator, dtype: torch.dtype = torch.float32) -> KVCache:
    kv = KVCache(1, _BLOCKS, _BS, _KVH, _HD, dtype, torch.device("cpu"))
    kv.data.copy_(torch.randn(kv.data.shape, generator=gen))
    return kv


def _check_rope_store(m: Any, gen: torch.Generator) -> None:
    _check_a_rope_store(m.rope_store_kv, torch.float32, gen)


def _check_a_rope_store(kernel: Callable[..., None], act: torch.dtype,
                        gen: torch.Generator) -> None:
    """``kernel`` (rope_store_kv on fp32 rows, rope_store_kv_bf16 on bf16 ones) against
    TorchOps, into an fp32 and a bf16 pool."""
    bf16 = act == torch.bfloat16
    for dtype in POOL_DTYPES:
        ref, fb = _torch_ops(), _decode_batch(gen, [1, 6, 19])
        kv_ref, qkv = _pool(gen, dtype), _randn(gen, 3, (_H + 2 * _KVH) * _HD).to(act)
        kv_ker = KVCache(1, _BLOCKS, _BS, _KVH, _HD, dtype, torch.device("cpu"))
        kv_ker.data.copy_(kv_ref.data)
        q_ref = ref.rope_store(qkv.clone(), fb, kv_ref, 0)[0]
        qkv_ker = qkv.clone()
        kernel(qkv_ker, fb.positions, ref.rope.cos, ref.rope.sin, _H, _KVH,
               kv_ker.k_slots(0), kv_ker.v_slots(0), fb.slot_mapping)
        (_close_bf16 if bf16 else _close)(qkv_ker[:, : _H * _HD].view(3, _H, _HD), q_ref)
        # Into a bf16 pool fp32 rows are rounded once, so at most one bf16 step apart
        # where fp32 summation order put a value on the other side of a rounding edge.
        tol = _BF16_TOL if bf16 else 1e-4 if dtype == torch.float32 else 2**-7
        torch.testing.assert_close(kv_ker.data.float(), kv_ref.data.float(), rtol=tol, atol=tol)


def _check_attention(m: Any, gen: torch.Generator) -> None:
    for dtype in POOL_DTYPES:
        ref, fb, kv = _torch_ops(), _decode_batch(gen, [1, 6, 19]), _pool(gen, dtype)
        q = _randn(gen, 3, _H, _HD)
        kv32 = _pool(gen)
        kv32.data.copy_(kv.data)  # the pool's very values, widened: an fp32 reference
        expected = ref.decode_attention(q, kv32, 0, fb, _HD**-0.5)
        got = m.paged_decode_attention(q, kv.k[0], kv.v[0], fb.decode_block_tables,
                                       fb.decode_seq_lens, _HD**-0.5)
        _close(got.view(3, -1), expected)


def _check_silu_mul(m: Any, gen: torch.Generator) -> None:
    gate_up = _randn(gen, 3, 2 * 37)
    _close(m.silu_mul(gate_up), _torch_ops().silu_mul(gate_up))


def _check_causal_attention(m: Any, gen: torch.Generator) -> None:
    # bf16 in and out: within bf16 rounding of the fp32 reference (as torch's bf16 is).
    for n, heads, kv_heads in ((1, 4, 2), (5, 4, 4), (37, 6, 2), (70, 3, 1)):
        qkv = _randn(gen, n, heads + 2 * kv_heads, 64).to(torch.bfloat16)
        q, k, v = qkv[:, :heads], qkv[:, heads:heads + kv_heads], qkv[:, heads + kv_heads:]
        ref = causal_self_attention(q.float(), k.float(), v.float(), 0.125)
        torch.testing.assert_close(m.causal_attention_bf16(q, k, v, 0.125).float(), ref,
                                   rtol=2e-2, atol=2e-2)


def _close_bf16(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.dtype == expected.dtype == torch.bfloat16, (actual.dtype, expected.dtype)
    torch.testing.assert_close(actual.float(), expected.float(), rtol=_BF16_TOL, atol=_BF16_TOL)


def _randn_bf16(gen: torch.Generator, *shape: int) -> torch.Tensor:
    return _randn(gen, *shape).to(torch.bfloat16)


def _check_rms_norm_bf16(m: Any, gen: torch.Generator) -> None:
    for n, d in ((3, 48), (2, 37)):  # 37: the non-multiple-of-8 tail
        x, delta, w = _randn_bf16(gen, n, d), _randn_bf16(gen, n, d), _randn(gen, d)
        x_ref, h_ref = _torch_ops().rms_norm(x.clone(), w, 1e-5, delta)
        x_ker = x.clone()
        _close_bf16(m.rms_norm_bf16(x_ker, delta, w, 1e-5), h_ref)
        _close_bf16(x_ker, x_ref)
        _close_bf16(m.rms_norm_bf16(x, None, w, 1e-5), _torch_ops().rms_norm(x, w, 1e-5)[1])


def _check_silu_mul_bf16(m: Any, gen: torch.Generator) -> None:
    for n, inter in ((3, 37), (2, 48)):  # 48: the 16-lane path of AVX-512 builds, no tail
        gate_up = _randn_bf16(gen, n, 2 * inter) * 3
        _close_bf16(m.silu_mul_bf16(gate_up), _torch_ops().silu_mul(gate_up))


def _check_rope_store_bf16(m: Any, gen: torch.Generator) -> None:
    _check_a_rope_store(m.rope_store_kv_bf16, torch.bfloat16, gen)


_CHECKS: dict[str, Callable[[Any, torch.Generator], None]] = {
    "linear_bf16w_packed": _check_linear_packed,
    "linear_bf16w": _check_linear,
    "rms_norm": _check_rms_norm,
    "rope_store_kv": _check_rope_store,
    "paged_decode_attention": _check_attention,
    "silu_mul": _check_silu_mul,
    "linear_int8w_packed": _check_linear_int8,
    "causal_attention_bf16": _check_causal_attention,
    "rms_norm_bf16": _check_rms_norm_bf16,
    "silu_mul_bf16": _check_silu_mul_bf16,
    "rope_store_kv_bf16": _check_rope_store_bf16,
}
