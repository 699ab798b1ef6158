"""KV codec round trips and the receiver's checks on a stream."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from pdserve.kvwire.codec import Encoding, bytes_per_token, decode, encode
from pdserve.kvwire.stream import (
    PROTOCOL_VERSION,
    FirstToken,
    KVChunk,
    KVHeader,
    KVStreamError,
    KVStreamValidator,
)
from pdserve.logprobs import Logprob

HEADER = KVHeader(PROTOCOL_VERSION, "m", num_layers=2, num_kv_heads=3, head_dim=8,
                  block_size=16, encoding=Encoding.BF16, num_tokens=5)
FIRST = FirstToken(Logprob(7, -0.5, []))


@pytest.mark.parametrize("enc", [Encoding.FP32, Encoding.BF16, Encoding.FP16, Encoding.INT8])
def test_round_trip(enc: Encoding) -> None:
    k, v = torch.randn(5, 3, 8), torch.randn(5, 3, 8)
    k2, v2 = decode(encode(k, v, enc), enc, 5, 3, 8)
    tol = {Encoding.FP32: 0, Encoding.BF16: 1e-2, Encoding.FP16: 1e-3, Encoding.INT8: 2e-2}[enc]
    assert torch.allclose(k2.float(), k, atol=tol * k.abs().max().item(), rtol=0)
    assert torch.allclose(v2.float(), v, atol=tol * v.abs().max().item(), rtol=0)


def test_bytes_per_token_int8_is_about_a_quarter_of_fp32() -> None:
    fp32 = bytes_per_token(Encoding.FP32, 30, 3, 64)
    assert fp32 == 2 * 30 * 3 * 64 * 4
    assert bytes_per_token(Encoding.BF16, 30, 3, 64) * 2 == fp32
    assert bytes_per_token(Encoding.INT8, 30, 3, 64) < fp32 / 3.5


def _chunk(seq: int, layer: int, offset: int, n: int, enc: Encoding = Encoding.BF16) -> KVChunk:
    payload = encode(torch.randn(n, 3, 8), torch.randn(n, 3, 8), enc)
    return KVChunk(seq, layer, offset, n, enc, payload, payload.crc32c())


def test_a_good_stream_passes() -> None:
    val = KVStreamValidator(HEADER)
    val.check_header(HEADER)
    for seq, (layer, off, n) in enumerate([(0, 0, 3), (1, 0, 3), (0, 3, 2), (1, 3, 2)]):
        val.check_chunk(_chunk(seq, layer, off, n))
    val.check_complete(FIRST)
    assert val.bytes_received == 2 * 2 * 5 * 3 * 8 * 2


@pytest.mark.parametrize("cached", [5, 6, 1_000_000])
def test_a_first_token_claiming_more_cached_tokens_than_the_prompt_has_is_refused(
        cached: int) -> None:
    val = KVStreamValidator(HEADER)
    val.check_header(HEADER)
    for seq, layer in enumerate((0, 1)):
        val.check_chunk(_chunk(seq, layer, 0, 5))
    val.check_complete(dataclasses.replace(FIRST, num_cached_tokens=4))  # all but the last
    with pytest.raises(KVStreamError) as e:
        val.check_complete(dataclasses.replace(FIRST, num_cached_tokens=cached))
    assert e.value.code == "INVALID_ARGUMENT" and "cached" in str(e.value)


@pytest.mark.parametrize(("change", "code"), [
    ({"model_name": "other"}, "FAILED_PRECONDITION"),
    ({"num_layers": 3}, "FAILED_PRECONDITION"),
    ({"head_dim": 16}, "FAILED_PRECONDITION"),
    ({"protocol_version": 99}, "FAILED_PRECONDITION"),
    ({"encoding": Encoding.FP32}, "FAILED_PRECONDITION"),
    ({"num_tokens": 6}, "INVALID_ARGUMENT"),
])
def test_header_for_another_model_is_refused(change: dict[str, object], code: str) -> None:
    with pytest.raises(KVStreamError) as e:
        KVStreamValidator(HEADER).check_header(dataclasses.replace(HEADER, **change))
    assert e.value.code == code


def _bad(chunk: KVChunk, code: str, seq_before: int = 0) -> None:
    val = KVStreamValidator(HEADER)
    val.check_header(HEADER)
    for s in range(seq_before):
        val.check_chunk(_chunk(s, s % 2, 0, 1))
    with pytest.raises(KVStreamError) as e:
        val.check_chunk(chunk)
    assert e.value.code == code, str(e.value)


def test_corrupt_truncated_reordered_wrong_shape_or_dtype_chunks() -> None:
    good = _chunk(0, 0, 0, 3)
    flipped = dataclasses.replace(good.payload, k=bytes([good.payload.k[0] ^ 1]) + good.payload.k[1:])
    _bad(dataclasses.replace(good, payload=flipped), "DATA_LOSS")  # CRC
    _bad(dataclasses.replace(good, seq=1), "DATA_LOSS")  # a chunk went missing
    _bad(_chunk(0, 0, 2, 2), "INVALID_ARGUMENT")  # tokens out of order
    _bad(_chunk(0, 5, 0, 2), "INVALID_ARGUMENT")  # no such layer
    _bad(_chunk(0, 0, 0, 9), "INVALID_ARGUMENT")  # past the prompt
    short = dataclasses.replace(good.payload, k=good.payload.k[:-2])
    _bad(dataclasses.replace(good, payload=short, crc32c=short.crc32c()), "INVALID_ARGUMENT")
    fp32 = encode(torch.randn(3, 3, 8), torch.randn(3, 3, 8), Encoding.FP32)
    _bad(KVChunk(0, 0, 0, 3, Encoding.BF16, fp32, fp32.crc32c()), "INVALID_ARGUMENT")  # dtype


def test_chunk_before_header_and_early_end() -> None:
    with pytest.raises(KVStreamError, match="before the header"):
        KVStreamValidator(HEADER).check_chunk(_chunk(0, 0, 0, 1))
    val = KVStreamValidator(HEADER)
    val.check_header(HEADER)
    val.check_chunk(_chunk(0, 0, 0, 5))
    with pytest.raises(KVStreamError) as e:
        val.check_complete(FIRST)
    assert e.value.code == "DATA_LOSS"
