"""Protobuf ⇄ domain conversions shared by the servicers (the only place, with the
servicers themselves, that touches ``*_pb2``)."""

from __future__ import annotations

from pdserve._proto.pdserve.v1 import common_pb2, worker_pb2
from pdserve.engine.request import Logprob
from pdserve.engine.sampling_params import SamplingParams
from pdserve.kvwire.codec import EncodedKV, Encoding
from pdserve.kvwire.stream import KVChunk, KVHeader


def params_from_pb(p: common_pb2.SamplingParams) -> SamplingParams:
    """Raises ValueError naming the field for out-of-range values."""
    return SamplingParams(
        max_tokens=p.max_tokens or 16,
        temperature=p.temperature,
        top_p=p.top_p or 1.0,
        top_k=p.top_k,
        seed=p.seed if p.HasField("seed") else None,
        stop=tuple(p.stop),
        stop_token_ids=tuple(p.stop_token_ids),
        ignore_eos=p.ignore_eos,
        min_tokens=p.min_tokens,
        logprobs=p.logprobs if p.HasField("logprobs") else None,
    )


def params_to_pb(p: SamplingParams) -> common_pb2.SamplingParams:
    out = common_pb2.SamplingParams(
        max_tokens=p.max_tokens, temperature=p.temperature, top_p=p.top_p, top_k=p.top_k,
        stop=list(p.stop), stop_token_ids=list(p.stop_token_ids), ignore_eos=p.ignore_eos,
        min_tokens=p.min_tokens)
    if p.seed is not None:
        out.seed = p.seed
    if p.logprobs is not None:
        out.logprobs = p.logprobs
    return out


def logprob_to_pb(lp: Logprob) -> common_pb2.TokenLogprob:
    return common_pb2.TokenLogprob(
        token_id=lp.token_id, logprob=lp.logprob,
        top=[common_pb2.TopLogprob(token_id=t, logprob=v) for t, v in lp.top])


def logprob_from_pb(lp: common_pb2.TokenLogprob) -> Logprob:
    return Logprob(lp.token_id, lp.logprob, [(t.token_id, t.logprob) for t in lp.top])


def header_to_pb(h: KVHeader) -> worker_pb2.KVHeader:
    return worker_pb2.KVHeader(
        protocol_version=h.protocol_version, model_name=h.model_name, num_layers=h.num_layers,
        num_kv_heads=h.num_kv_heads, head_dim=h.head_dim, block_size=h.block_size,
        encoding=int(h.encoding), num_tokens=h.num_tokens)


def header_from_pb(h: worker_pb2.KVHeader) -> KVHeader:
    return KVHeader(h.protocol_version, h.model_name, h.num_layers, h.num_kv_heads, h.head_dim,
                    h.block_size, _encoding(h.encoding), h.num_tokens)


def chunk_to_pb(c: KVChunk) -> worker_pb2.KVChunk:
    p = c.payload
    return worker_pb2.KVChunk(
        seq=c.seq, layer=c.layer, token_offset=c.token_offset, num_tokens=c.num_tokens,
        encoding=int(c.encoding), k=p.k, v=p.v, k_scales=p.k_scales, v_scales=p.v_scales,
        crc32c=c.crc32c)


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
