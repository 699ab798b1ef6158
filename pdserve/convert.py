"""Protobuf ⇄ domain conversions of the KV stream (used by both workers)."""

from __future__ import annotations

from google.protobuf.message import DecodeError

from pdserve._proto.pdserve.v1 import worker_pb2
from pdserve.kvwire.chunk_message import parse_chunk_message
from pdserve.kvwire.codec import EncodedKV, Encoding
from pdserve.kvwire.stream import KVChunk, KVHeader, KVStreamError


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
        k=bytes(p.k), v=bytes(p.v), k_scales=bytes(p.k_scales), v_scales=bytes(p.v_scales),
        crc32c=c.crc32c)


def response_bytes(message: worker_pb2.PrefillResponse | bytes) -> bytes:
    """The Prefill stream's serializer: chunks arrive already serialized
    (``kvwire.chunk_message``)."""
    return message if isinstance(message, bytes) else message.SerializeToString()


def parse_prefill_response(data: bytes) -> KVChunk | worker_pb2.PrefillResponse:
    """The Prefill stream's messages, received as bytes: chunks parsed without a copy,
    the rest (header, first token) by protobuf."""
    chunk = parse_chunk_message(data)
    if chunk is not None:
        return chunk
    try:
        return worker_pb2.PrefillResponse.FromString(data)
    except DecodeError as e:
        raise KVStreamError("DATA_LOSS", f"malformed Prefill message: {e}") from None


def chunk_from_pb(c: worker_pb2.KVChunk) -> KVChunk:
    payload = EncodedKV(c.k, c.v, c.k_scales, c.v_scales)
    return KVChunk(c.seq, c.layer, c.token_offset, c.num_tokens, _encoding(c.encoding),
                   payload, c.crc32c)


def _encoding(value: int) -> Encoding:
    try:
        return Encoding(value)
    except ValueError:
        raise KVStreamError("INVALID_ARGUMENT", f"unknown KV encoding {value}") from None
