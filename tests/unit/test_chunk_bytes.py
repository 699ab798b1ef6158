"""KV chunks serialized by hand parse back to the same protobuf message."""

from __future__ import annotations

import torch

from pdserve._proto.pdserve.v1 import worker_pb2
from pdserve.convert import chunk_from_pb, chunk_response_bytes, chunk_to_pb
from pdserve.kvwire.codec import Encoding, encode
from pdserve.kvwire.stream import KVChunk


def test_hand_serialized_chunk_equals_protobuf_for_every_encoding() -> None:
    k, v = torch.randn(300, 3, 64), torch.randn(300, 3, 64)
    for enc in (Encoding.FP32, Encoding.BF16, Encoding.FP16, Encoding.INT8):
        payload = encode(k, v, enc)
        chunk = KVChunk(7, 29, 1024, 300, enc, payload, payload.crc32c())
        parsed = worker_pb2.PrefillResponse.FromString(chunk_response_bytes(chunk))
        assert parsed.WhichOneof("kind") == "chunk"
        assert parsed.chunk == chunk_to_pb(chunk)
        assert chunk_from_pb(parsed.chunk) == chunk


def test_empty_payload_fields_are_left_out_like_protobuf_does() -> None:
    # Same fields, other order (the payload goes last): same length, same message.
    payload = encode(torch.zeros(1, 1, 8), torch.zeros(1, 1, 8), Encoding.FP16)
    chunk = KVChunk(0, 0, 0, 1, Encoding.FP16, payload, payload.crc32c())
    expected = worker_pb2.PrefillResponse(chunk=chunk_to_pb(chunk))
    assert len(chunk_response_bytes(chunk)) == expected.ByteSize()
