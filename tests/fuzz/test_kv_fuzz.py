"""Finding 5 (item 8): the KV stream parser and validator under fuzzing.

Arbitrary bytes through ``parse_prefill_response``, and valid streams with one
message mutated (bits flipped, cut, grown, replaced, reordered, dropped, repeated)
through the whole receive path (parse, validate, decode, finite check, write):
the only exception is ``KVStreamError``, and nothing is ever written outside the
reserved rows (guard rows around them keep their sentinel).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pdserve.convert import event_to_pb, parse_prefill_response
from pdserve.kvwire.chunk_message import encode_chunk_message
from pdserve.kvwire.codec import Encoding
from pdserve.kvwire.receiver import receive_kv
from pdserve.kvwire.stream import (
    PROTOCOL_VERSION,
    FirstToken,
    KVEvent,
    KVHeader,
    KVStreamError,
    KVStreamValidator,
)
from pdserve.logprobs import Logprob

LAYERS, HEADS, HD, TOKENS, CHUNK, GUARD = 2, 2, 4, 10, 4, 3
SENTINEL = 12345.0
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))


def _header(encoding: Encoding) -> KVHeader:
    return KVHeader(PROTOCOL_VERSION, "tiny", LAYERS, HEADS, HD, 16, encoding, TOKENS)


def _stream(encoding: Encoding) -> list[bytes]:
    """A valid Prefill stream as its wire messages."""
    gen = torch.Generator().manual_seed(0)
    out = [event_to_pb(_header(encoding)).SerializeToString()]
    seq = 0
    for start in range(0, TOKENS, CHUNK):
        n = min(CHUNK, TOKENS - start)
        for layer in range(LAYERS):
            k, v = (torch.randn(n, HEADS, HD, generator=gen) for _ in range(2))
            out.append(encode_chunk_message(seq, layer, start, k, v, encoding)[0])
            seq += 1
    first = FirstToken(Logprob(7, -0.5, [(7, -0.5), (3, -1.0)]), 0.01, TOKENS)
    out.append(event_to_pb(first).SerializeToString())
    return out


STREAMS = {e: _stream(e) for e in (Encoding.FP32, Encoding.BF16, Encoding.FP16, Encoding.INT8)}


@FUZZ
@given(data=st.binary(max_size=300))
def test_finding5_arbitrary_bytes_parse_or_fail_with_kv_stream_error(data: bytes) -> None:
    try:
        parse_prefill_response(data)
    except KVStreamError as e:
        assert e.code in ("DATA_LOSS", "INVALID_ARGUMENT"), e.code


@st.composite
def _mutated(draw: st.DrawFn) -> tuple[Encoding, list[bytes]]:
    encoding = draw(st.sampled_from(list(STREAMS)))
    msgs = list(STREAMS[encoding])
    i = draw(st.integers(0, len(msgs) - 1))
    m = bytearray(msgs[i])
    kind = draw(st.sampled_from(["flip", "cut", "grow", "replace", "swap", "drop", "repeat",
                                 "set_byte"]))
    if kind == "flip":
        pos = draw(st.integers(0, len(m) - 1))
        m[pos] ^= 1 << draw(st.integers(0, 7))
    elif kind == "set_byte":
        m[draw(st.integers(0, min(len(m) - 1, 40)))] = draw(st.integers(0, 255))
    elif kind == "cut":
        m = m[:draw(st.integers(0, len(m)))]
    elif kind == "grow":
        m += draw(st.binary(min_size=1, max_size=20))
    elif kind == "replace":
        m = bytearray(draw(st.binary(max_size=100)))
    if kind in ("flip", "set_byte", "cut", "grow", "replace"):
        msgs[i] = bytes(m)
    elif kind == "swap":
        j = draw(st.integers(0, len(msgs) - 1))
        msgs[i], msgs[j] = msgs[j], msgs[i]
    elif kind == "drop":
        del msgs[i]
    else:
        msgs.insert(i, msgs[i])
    return encoding, msgs


async def _events(msgs: list[bytes]) -> AsyncGenerator[KVEvent, None]:
    for m in msgs:
        yield parse_prefill_response(m)


def _receive(encoding: Encoding, msgs: list[bytes]) -> torch.Tensor:
    """Runs the receive path into reserved rows [GUARD, GUARD + TOKENS) of each layer."""
    pool = torch.full((LAYERS, GUARD + TOKENS + GUARD, HEADS, HD), SENTINEL)

    def write(layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        n = k.shape[0]
        assert 0 <= layer < LAYERS and 0 <= start and start + n <= TOKENS, (layer, start, n)
        assert k.shape == v.shape == (n, HEADS, HD)
        pool[layer, GUARD + start:GUARD + start + n] = k.float()

    validator = KVStreamValidator(_header(encoding))
    try:
        first, _ = asyncio.run(receive_kv(_events(msgs), validator, write))
        assert 0 <= first.token.token_id  # a mutated token id is the engine's to refuse
    except KVStreamError as e:
        assert e.code in ("DATA_LOSS", "INVALID_ARGUMENT", "FAILED_PRECONDITION"), e.code
    return pool


@FUZZ
@given(case=_mutated())
def test_finding5_mutated_streams_fail_cleanly_and_write_only_reserved_rows(
        case: tuple[Encoding, list[bytes]]) -> None:
    pool = _receive(*case)
    assert bool((pool[:, :GUARD] == SENTINEL).all() and (pool[:, -GUARD:] == SENTINEL).all())
    assert bool(torch.isfinite(pool).all())  # whatever was written is finite


def test_finding5_the_unmutated_stream_is_received_whole() -> None:
    for encoding, msgs in STREAMS.items():
        pool = _receive(encoding, msgs)
        assert bool((pool[:, GUARD:GUARD + TOKENS] != SENTINEL).all()), encoding
