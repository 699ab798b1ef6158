"""Encode K/V tensors into bytes for the wire and back.

Encodings: the model dtype, fp32, bf16, fp16, and int8 with one fp32 scale per
token and KV head (symmetric, scale = max|x| / 127). Bytes are little-endian,
row-major ``(tokens, kv_heads, head_dim)``. Every chunk carries a CRC32C over its
payload. Nothing here is pickled: raw numbers only.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import google_crc32c
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
    k: bytes
    v: bytes
    k_scales: bytes = b""
    v_scales: bytes = b""

    @property
    def nbytes(self) -> int:
        return len(self.k) + len(self.v) + len(self.k_scales) + len(self.v_scales)

    def crc32c(self) -> int:
        crc = 0
        for part in (self.k, self.v, self.k_scales, self.v_scales):
            crc = google_crc32c.extend(crc, part)
        return int(crc)


def _raw(t: torch.Tensor) -> bytes:
    t = t.contiguous().cpu()
    if t.dtype == torch.bfloat16:  # numpy has no bf16: ship the bits
        t = t.view(torch.int16)
    return t.numpy().tobytes()


def _quantize(x: torch.Tensor) -> tuple[bytes, bytes]:
    x = x.float()  # (n, kvh, hd)
    scale = x.abs().amax(dim=-1).clamp_min(1e-8) / 127.0  # (n, kvh)
    q = torch.round(x / scale.unsqueeze(-1)).clamp_(-127, 127).to(torch.int8)
    return _raw(q), _raw(scale)


def encode(k: torch.Tensor, v: torch.Tensor, encoding: Encoding) -> EncodedKV:
    """K/V (n, kvh, hd) of one layer → bytes in ``encoding`` (never MODEL here)."""
    if encoding is Encoding.INT8:
        kq, ks = _quantize(k)
        vq, vs = _quantize(v)
        return EncodedKV(kq, vq, ks, vs)
    dt = _FLOAT[encoding]
    return EncodedKV(_raw(k.to(dt)), _raw(v.to(dt)))


def expected_sizes(encoding: Encoding, n: int, kv_heads: int, head_dim: int) -> tuple[int, int]:
    """(bytes of k or v, bytes of k_scales or v_scales) for ``n`` tokens."""
    if encoding is Encoding.INT8:
        return n * kv_heads * head_dim, n * kv_heads * 4
    return n * kv_heads * head_dim * _FLOAT[encoding].itemsize, 0


def _tensor(buf: bytes, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    if dtype == torch.bfloat16:
        return _tensor(buf, torch.int16, shape).view(torch.bfloat16)
    return torch.frombuffer(bytearray(buf), dtype=dtype).view(shape)


def decode(enc: EncodedKV, encoding: Encoding, n: int, kv_heads: int,
           head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Bytes → K/V (n, kvh, hd). Sizes must have been checked (``expected_sizes``)."""
    shape = (n, kv_heads, head_dim)
    if encoding is Encoding.INT8:
        ks = _tensor(enc.k_scales, torch.float32, (n, kv_heads, 1))
        vs = _tensor(enc.v_scales, torch.float32, (n, kv_heads, 1))
        k = _tensor(enc.k, torch.int8, shape).float() * ks
        v = _tensor(enc.v, torch.int8, shape).float() * vs
        return k, v
    dt = _FLOAT[encoding]
    return _tensor(enc.k, dt, shape), _tensor(enc.v, dt, shape)
