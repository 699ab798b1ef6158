"""Protobuf ⇄ domain conversions of the KV stream (both workers): the one place on
the KV path that sees ``worker_pb2``. Past it there are only domain events
(``KVHeader``, ``KVChunk``, ``FirstToken``) and ``KVRequest``."""

from __future__ import annotations

from google.protobuf.message import DecodeError

from pdserve._proto.pdserve.v1 import worker_pb2
from pdserve.kvwire.chunk_message import parse_chunk_message
from pdserve.kvwire.codec import Encoding
from pdserve.kvwire.stream import FirstToken, KVEvent, KVHeader, KVRequest, KVStreamError
from pdserve.params_pb import logprob_from_pb, logprob_to_pb, params_from_pb, params_to_pb


def kv_request_to_pb(r: KVRequest) -> worker_pb2.PrefillRequest:
    return worker_pb2.PrefillRequest(
        request_id=r.request_id, prompt_token_ids=r.prompt, params=params_to_pb(r.params),
        encoding=int(r.encoding),  # type: ignore[arg-type]
        num_cached_tokens=r.num_cached_tokens)


def kv_request_from_pb(r: worker_pb2.PrefillRequest) -> KVRequest:
    """Raises ValueError naming the field for out-of-range values."""
    try:
        encoding = Encoding(r.encoding)
    except ValueError:
        raise ValueError(f"encoding must be a KVEncoding, got {r.encoding}") from None
    prompt = list(r.prompt_token_ids)
    if prompt and r.num_cached_tokens >= len(prompt):
        raise ValueError(f"num_cached_tokens must be below the prompt's {len(prompt)} tokens, "
                         f"got {r.num_cached_tokens}")
    return KVRequest(r.request_id, prompt, params_from_pb(r.params), encoding,
                     r.num_cached_tokens)


def event_to_pb(e: KVHeader | FirstToken) -> worker_pb2.PrefillResponse:
    """The header and the first token; chunks are written as bytes (kvwire.chunk_message)."""
    if isinstance(e, KVHeader):
        return worker_pb2.PrefillResponse(header=worker_pb2.KVHeader(
            protocol_version=e.protocol_version, model_name=e.model_name,
            num_layers=e.num_layers, num_kv_heads=e.num_kv_heads, head_dim=e.head_dim,
            block_size=e.block_size, encoding=int(e.encoding),  # type: ignore[arg-type]
            num_tokens=e.num_tokens, num_cached_tokens=e.num_cached_tokens))
    return worker_pb2.PrefillResponse(first_token=worker_pb2.FirstToken(
        token=logprob_to_pb(e.token), prefill_compute_s=e.prefill_compute_s,
        num_prompt_tokens=e.num_prompt_tokens, num_cached_tokens=e.num_cached_tokens))


def response_bytes(message: worker_pb2.PrefillResponse | bytes) -> bytes:
    """The Prefill stream's serializer: chunks arrive already serialized
    (``kvwire.chunk_message``)."""
    return message if isinstance(message, bytes) else message.SerializeToString()


def parse_prefill_response(data: bytes) -> KVEvent:
    """One Prefill stream message, received as bytes, as a domain event: chunks parsed
    without a copy, the header and first token through protobuf."""
    chunk = parse_chunk_message(data)
    if chunk is not None:
        return chunk
    try:
        msg = worker_pb2.PrefillResponse.FromString(data)
    except DecodeError as e:
        raise KVStreamError("DATA_LOSS", f"malformed Prefill message: {e}") from None
    kind = msg.WhichOneof("kind")
    if kind == "header":
        return _header(msg.header)
    if kind == "first_token":
        t = msg.first_token
        return FirstToken(logprob_from_pb(t.token), t.prefill_compute_s, t.num_prompt_tokens,
                          t.num_cached_tokens)
    raise KVStreamError("DATA_LOSS", "Prefill message holds neither header, chunk nor token")


def _header(h: worker_pb2.KVHeader) -> KVHeader:
    return KVHeader(h.protocol_version, h.model_name, h.num_layers, h.num_kv_heads, h.head_dim,
                    h.block_size, _encoding(h.encoding), h.num_tokens, h.num_cached_tokens)


def _encoding(value: int) -> Encoding:
    try:
        return Encoding(value)
    except ValueError:
        raise KVStreamError("INVALID_ARGUMENT", f"unknown KV encoding {value}") from None
