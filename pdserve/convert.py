"""Protobuf ⇄ domain conversions of the KV stream (used by both workers)."""

from __future__ import annotations

from pdserve._proto.pdserve.v1 import worker_pb2
from pdserve.kvwire.codec import EncodedKV, Encoding
from pdserve.kvwire.stream import KVChunk, KVHeader


def header_to_pb(h: KVHeader) -> worker_pb2.KVHeader:
    return worker_pb2.KVHeader(
        protocol_version=h.protocol_version, model_name=h.model_name, num_layers=h.num_layers,
        num_kv_heads=h.num_kv_heads, head_dim=h.head_dim, block_size=h.block_size,
        encoding=int(h.encoding), num_tokens=h.num_tokens)  # type: ignore[arg-type]


def header_from_pb(h: worker_pb2.KVHeader) -> KVHeader:
    return KVHeader(h.protocol_version, h.model_name, h.num_layers, h.num_kv_heads, h.head_dim,
                    h.block_size, _encoding(h.encoding), h.num_tokens)


def chunk_to_pb(c: KVChunk) -> worker_pb2.KVChunk:
    p = c.payload
    return worker_pb2.KVChunk(
        seq=c.seq, layer=c.layer, token_offset=c.token_offset, num_tokens=c.num_tokens,
        encoding=int(c.encoding),  # type: ignore[arg-type]
        k=p.k, v=p.v, k_scales=p.k_scales, v_scales=p.v_scales, crc32c=c.crc32c)


def chunk_response_bytes(c: KVChunk) -> bytes:
    """``PrefillResponse{chunk: c}`` serialized, copying the payload once.

    Building the message with protobuf copies the payload into it and again when
    serializing; on loopback those copies cost a third of the stream's rate. The
    small fields go through protobuf, the four payload fields are appended in the
    same wire format (a field may follow the others in any order).
    """
    p = c.payload
    small = worker_pb2.KVChunk(
        seq=c.seq, layer=c.layer, token_offset=c.token_offset, num_tokens=c.num_tokens,
        encoding=int(c.encoding), crc32c=c.crc32c).SerializeToString()  # type: ignore[arg-type]
    parts: list[bytes] = [small]
    for number, data in ((6, p.k), (7, p.v), (8, p.k_scales), (9, p.v_scales)):
        if data:
            parts += [_varint(number << 3 | 2) + _varint(len(data)), data]
    body = sum(len(x) for x in parts)
    return b"".join([_varint(2 << 3 | 2) + _varint(body), *parts])  # field 2: chunk


def response_bytes(message: worker_pb2.PrefillResponse | bytes) -> bytes:
    """The Prefill stream's serializer: chunks arrive already serialized."""
    return message if isinstance(message, bytes) else message.SerializeToString()


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def chunk_from_pb(c: worker_pb2.KVChunk) -> KVChunk:
    payload = EncodedKV(c.k, c.v, c.k_scales, c.v_scales)
    return KVChunk(c.seq, c.layer, c.token_offset, c.num_tokens, _encoding(c.encoding),
                   payload, c.crc32c)


def _encoding(value: int) -> Encoding:
    from pdserve.kvwire.stream import KVStreamError

    try:
        return Encoding(value)
    except ValueError:
        raise KVStreamError("INVALID_ARGUMENT", f"unknown KV encoding {value}") from None
