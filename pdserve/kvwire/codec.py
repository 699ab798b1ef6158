"""Encode K/V tensors into bytes for the wire and back.

Encodings: the model dtype, fp32, bf16, fp16, and int8 with one fp32 scale per
token and KV head (symmetric, scale = max|x| / 127). Bytes are little-endian,
row-major ``(tokens, kv_heads, head_dim)``. Every chunk carries a CRC32C over its
payload. Nothing here is pickled: raw numbers only.
"""

from __future__ import annotations

import enum
import warnings
from dataclasses import dataclass

import crc32c
import torch


class Encoding(enum.IntEnum):
    """Values match ``pdserve.v1.KVEncoding``."""

    MODEL = 0
    FP32 = 1
    BF16 = 2
    FP16 = 3
    INT8 = 4

    @classmethod
    def parse(cls, name: str) -> Encoding:
        try:
            return cls[name.upper()]
        except KeyError:
            allowed = ", ".join(e.name.lower() for e in cls)
            raise ValueError(f"kv encoding must be one of {allowed}, got {name!r}") from None


# Received payloads are immutable bytes; tensors over them are only ever read.
warnings.filterwarnings("ignore", message="The given buffer is not writable", category=UserWarning)

_FLOAT = {Encoding.FP32: torch.float32, Encoding.BF16: torch.bfloat16,
          Encoding.FP16: torch.float16}
_MODEL = {torch.float32: Encoding.FP32, torch.bfloat16: Encoding.BF16,
          torch.float16: Encoding.FP16}


def resolve(encoding: Encoding, model_dtype: torch.dtype) -> Encoding:
    """MODEL → the encoding of the model's (weight) dtype: a bf16 model ships bf16 KV
    even where its KV cache is kept in fp32 for compute."""
    return _MODEL[model_dtype] if encoding is Encoding.MODEL else encoding


def bytes_per_token(encoding: Encoding, num_layers: int, kv_heads: int, head_dim: int) -> int:
    """Wire bytes of one token's K and V over all layers (payload only)."""
    if encoding is Encoding.INT8:
        per_layer = kv_heads * head_dim + kv_heads * 4
    else:
        per_layer = kv_heads * head_dim * _FLOAT[encoding].itemsize
    return 2 * num_layers * per_layer


@dataclass
class EncodedKV:
    """One layer's payload: bytes, or memoryviews into a received message."""

    k: bytes | memoryview
    v: bytes | memoryview
    k_scales: bytes | memoryview = b""
    v_scales: bytes | memoryview = b""

    @property
    def nbytes(self) -> int:
        return len(self.k) + len(self.v) + len(self.k_scales) + len(self.v_scales)

    def crc32c(self) -> int:
        crc = 0
        for part in (self.k, self.v, self.k_scales, self.v_scales):
            crc = crc32c.crc32c(part, crc)
        return int(crc)


def _as(view: memoryview, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    """A tensor over ``view``'s bytes, no copy (read-only views included: nothing here
    writes through them, and the tensor keeps the buffer alive)."""
    if dtype == torch.bfloat16:  # frombuffer has no bf16: same bits as int16
        return _as(view, torch.int16, shape).view(torch.bfloat16)
    return torch.frombuffer(view, dtype=dtype).view(shape)


@dataclass(frozen=True)
class Int8Rows:
    """K or V of n tokens quantized for the wire: int8 values and one fp32 scale per
    token and KV head."""

    q: torch.Tensor  # (n, kvh, hd) int8
    scale: torch.Tensor  # (n, kvh) fp32

    @property
    def shape(self) -> torch.Size:
        return self.q.shape


WireRows = torch.Tensor | Int8Rows  # K or V (n, kvh, hd), float or quantized


def quantize_int8(x: torch.Tensor) -> Int8Rows:
    """Symmetric int8 per token and head, on ``x``'s device."""
    x = x.detach().float()
    scale = x.abs().amax(dim=-1).clamp_min(1e-8) / 127.0  # (n, kvh)
    q = torch.round(x / scale.unsqueeze(-1)).clamp_(-127, 127).to(torch.int8)
    return Int8Rows(q, scale)


def to_wire(x: torch.Tensor, encoding: Encoding) -> WireRows:
    """K or V (n, kvh, hd) as ``encoding`` puts it on the wire, on ``x``'s device (a GPU
    converts before its device → host copy, so the host only copies bytes)."""
    if encoding is Encoding.INT8:
        return quantize_int8(x)
    return x.detach().to(_FLOAT[encoding])


def encode_into(x: WireRows, encoding: Encoding, data: memoryview,
                scales: memoryview) -> None:
    """One layer's K or V (n, kvh, hd) written in ``encoding`` into ``data`` (and, for
    int8, its per-token, per-head scales into ``scales``): one conversion pass, or a
    plain copy when ``x`` is in the wire's form already (``to_wire``)."""
    if encoding is Encoding.INT8:
        rows = x if isinstance(x, Int8Rows) else quantize_int8(x)
        _as(scales, torch.float32, tuple(rows.scale.shape)).copy_(rows.scale)
        _as(data, torch.int8, tuple(rows.q.shape)).copy_(rows.q)
        return
    assert isinstance(x, torch.Tensor), "quantized rows go out as int8 only"
    _as(data, _FLOAT[encoding], tuple(x.shape)).copy_(x.detach())


def encode(k: WireRows, v: WireRows, encoding: Encoding) -> EncodedKV:
    """K/V (n, kvh, hd) of one layer → bytes in ``encoding`` (never MODEL here)."""
    data, scales = expected_sizes(encoding, *k.shape)
    parts = [bytearray(size) for size in (data, data, scales, scales)]
    encode_into(k, encoding, memoryview(parts[0]), memoryview(parts[2]))
    encode_into(v, encoding, memoryview(parts[1]), memoryview(parts[3]))
    return EncodedKV(*map(bytes, parts))


def expected_sizes(encoding: Encoding, n: int, kv_heads: int, head_dim: int) -> tuple[int, int]:
    """(bytes of k or v, bytes of k_scales or v_scales) for ``n`` tokens."""
    if encoding is Encoding.INT8:
        return n * kv_heads * head_dim, n * kv_heads * 4
    return n * kv_heads * head_dim * _FLOAT[encoding].itemsize, 0


def decode(enc: EncodedKV, encoding: Encoding, n: int, kv_heads: int,
           head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Bytes → K/V (n, kvh, hd), views of the payload where the encoding allows
    (read-only: the caller copies them into its cache). Sizes must have been checked
    (``expected_sizes``)."""
    shape = (n, kv_heads, head_dim)
    if encoding is Encoding.INT8:
        ks = _as(memoryview(enc.k_scales), torch.float32, (n, kv_heads, 1))
        vs = _as(memoryview(enc.v_scales), torch.float32, (n, kv_heads, 1))
        k = _as(memoryview(enc.k), torch.int8, shape).float() * ks
        v = _as(memoryview(enc.v), torch.int8, shape).float() * vs
        return k, v
    dt = _FLOAT[encoding]
    return _as(memoryview(enc.k), dt, shape), _as(memoryview(enc.v), dt, shape)
