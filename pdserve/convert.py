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
