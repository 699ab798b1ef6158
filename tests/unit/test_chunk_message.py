"""KV chunk messages written and read without protobuf objects agree with protobuf,
both ways, and malformed bytes fail with DATA_LOSS instead of a crash."""

from __future__ import annotations

import pytest
import torch

from pdserve._proto.pdserve.v1 import worker_pb2
from pdserve.convert import parse_prefill_response
from pdserve.kvwire.chunk_message import encode_chunk_message, parse_chunk_message, varint
from pdserve.kvwire.codec import EncodedKV, Encoding, decode, encode
from pdserve.kvwire.stream import FirstToken, KVChunk, KVStreamError
from pdserve.logprobs import Logprob

ENCODINGS = (Encoding.FP32, Encoding.BF16, Encoding.FP16, Encoding.INT8)


def _reference(seq: int, layer: int, start: int, k: torch.Tensor, v: torch.Tensor,
               enc: Encoding) -> KVChunk:
    payload = encode(k, v, enc)
    return KVChunk(seq, layer, start, k.shape[0], enc, payload, payload.crc32c())


def chunk_to_pb(c: KVChunk) -> worker_pb2.KVChunk:
    """The protobuf library's own message for ``c`` (the reference to agree with)."""
    p = c.payload
    return worker_pb2.KVChunk(
        seq=c.seq, layer=c.layer, token_offset=c.token_offset, num_tokens=c.num_tokens,
        encoding=int(c.encoding),  # type: ignore[arg-type]
        k=bytes(p.k), v=bytes(p.v), k_scales=bytes(p.k_scales), v_scales=bytes(p.v_scales),
        crc32c=c.crc32c)


def chunk_from_pb(c: worker_pb2.KVChunk) -> KVChunk:
    payload = EncodedKV(c.k, c.v, c.k_scales, c.v_scales)
    return KVChunk(c.seq, c.layer, c.token_offset, c.num_tokens, Encoding(c.encoding),
                   payload, c.crc32c)


def test_written_message_is_the_protobuf_message_for_every_encoding() -> None:
    k, v = torch.randn(300, 3, 64), torch.randn(300, 3, 64)
    for enc in ENCODINGS:
        data, nbytes = encode_chunk_message(7, 29, 1024, k, v, enc)
        parsed = worker_pb2.PrefillResponse.FromString(data)
        assert parsed.WhichOneof("kind") == "chunk"
        expected = _reference(7, 29, 1024, k, v, enc)
        assert parsed.chunk == chunk_to_pb(expected)
        assert nbytes == expected.payload.nbytes
        assert len(data) == worker_pb2.PrefillResponse(chunk=parsed.chunk).ByteSize()


def test_protobuf_serialized_chunk_parses_to_the_same_chunk_without_copies() -> None:
    k, v = torch.randn(5, 2, 8), torch.randn(5, 2, 8)
    for enc in ENCODINGS:
        expected = _reference(0, 0, 0, k, v, enc)  # zero fields are left out by protobuf
        data = worker_pb2.PrefillResponse(chunk=chunk_to_pb(expected)).SerializeToString()
        chunk = parse_chunk_message(data)
        assert chunk == expected
        assert chunk is not None and isinstance(chunk.payload.k, memoryview)
        assert chunk.payload.crc32c() == chunk.crc32c
        dk, _ = decode(chunk.payload, enc, 5, 2, 8)
        ref, _ = decode(expected.payload, enc, 5, 2, 8)
        assert torch.equal(dk, ref)


def test_unknown_fields_are_skipped_and_the_last_repeated_field_wins() -> None:
    k = torch.randn(2, 1, 4)
    chunk = _reference(3, 1, 0, k, k, Encoding.FP32)
    inner = chunk_to_pb(chunk).SerializeToString()
    stale_k = chunk_to_pb(_reference(3, 1, 0, k + 1, k, Encoding.FP32)).SerializeToString()
    unknown = bytes([99 << 3 & 0x7F | 0x80, 99 >> 4, 5])  # field 99, varint 5
    body = stale_k + unknown + inner
    data = bytes([2 << 3 | 2]) + varint(len(body)) + body
    assert parse_chunk_message(data) == chunk
    assert chunk_from_pb(worker_pb2.PrefillResponse.FromString(data).chunk) == chunk


def test_header_and_first_token_go_through_protobuf() -> None:
    msg = worker_pb2.PrefillResponse(first_token=worker_pb2.FirstToken(num_prompt_tokens=3))
    data = msg.SerializeToString()
    assert parse_chunk_message(data) is None
    assert parse_prefill_response(data) == FirstToken(Logprob(0, 0.0, []), 0.0, 3)


@pytest.mark.parametrize("cut", [1, 10, 200])
def test_truncated_or_garbled_bytes_are_data_loss(cut: int) -> None:
    data, _ = encode_chunk_message(1, 2, 3, torch.randn(4, 2, 8), torch.randn(4, 2, 8),
                                   Encoding.BF16)
    with pytest.raises(KVStreamError) as e:
        parse_prefill_response(data[:-cut])
    assert e.value.code == "DATA_LOSS"
    with pytest.raises(KVStreamError) as e:
        parse_prefill_response(bytes([2 << 3 | 0, 0xFF]))  # chunk field as a bad varint
    assert e.value.code == "DATA_LOSS"


def test_unknown_encoding_is_invalid_argument() -> None:
    body = bytes([5 << 3, 42])  # encoding = 42
    with pytest.raises(KVStreamError) as e:
        parse_chunk_message(bytes([2 << 3 | 2, len(body)]) + body)
    assert e.value.code == "INVALID_ARGUMENT"

