"""The hostile peer's modes on a synthetic stream, without processes: each hostile mode
really sends something other than the honest stream (a mode that changed nothing
would test nothing), the poisoned ones keep a valid CRC, the honest-but-odd ones
carry exactly the honest content; and pdserve's own parser reads what they send."""

from __future__ import annotations

import numpy as np
import pytest

from bench.chaos.hostile_modes import MODES, Expect, Honest, crc_of, mode_of
from pdserve._proto.pdserve.v1 import common_pb2, worker_pb2
from pdserve.convert import parse_prefill_response
from pdserve.kvwire.stream import KVChunk, KVStreamError

FP32 = common_pb2.KV_ENCODING_FP32
LAYERS, HEADS, HEAD_DIM, TOKENS, VOCAB = 2, 2, 16, 5, 320


def honest_stream() -> Honest:
    rng = np.random.default_rng(0)
    header = worker_pb2.PrefillResponse(header=worker_pb2.KVHeader(
        protocol_version=1, model_name="tiny", num_layers=LAYERS, num_kv_heads=HEADS,
        head_dim=HEAD_DIM, block_size=16, encoding=FP32, num_tokens=TOKENS))
    chunks = []
    for layer in range(LAYERS):
        k, v = (rng.standard_normal((TOKENS, HEADS, HEAD_DIM), np.float32).tobytes()
                for _ in range(2))
        c = worker_pb2.KVChunk(seq=layer, layer=layer, token_offset=0, num_tokens=TOKENS,
                               encoding=FP32, k=k, v=v)
        c.crc32c = crc_of(c)
        chunks.append(worker_pb2.PrefillResponse(chunk=c))
    first = worker_pb2.PrefillResponse(first_token=worker_pb2.FirstToken(
        token=common_pb2.TokenLogprob(token_id=7, logprob=-0.5), num_prompt_tokens=TOKENS))
    return Honest.of([header, *chunks, first], VOCAB)


def honest_bytes(h: Honest) -> list[bytes]:
    return [m.SerializeToString() for m in [h.header, *h.chunks, h.first]]


@pytest.mark.parametrize("mode", [m for m, (e, _) in MODES.items() if e is Expect.REJECT])
def test_every_hostile_mode_changes_the_stream(mode: str) -> None:
    h = honest_stream()
    script = MODES[mode][1](h)
    sent = [data for _, data in script.sends]
    assert sent != honest_bytes(h) or script.end != "ok", f"{mode} sends the honest stream"


@pytest.mark.parametrize("mode", ["chunk_nan_valid_crc", "chunk_inf_valid_crc"])
def test_poisoned_chunks_pass_the_crc(mode: str) -> None:
    script = MODES[mode][1](honest_stream())
    chunk = parse_prefill_response(script.sends[1][1])
    assert isinstance(chunk, KVChunk)
    assert chunk.payload.crc32c() == chunk.crc32c
    values = np.frombuffer(bytes(chunk.payload.k), np.float32)
    assert not np.isfinite(values).all()


@pytest.mark.parametrize("mode", ["passthrough", "slow_drip"])
def test_honest_modes_send_the_honest_stream(mode: str) -> None:
    h = honest_stream()
    script = MODES[mode][1](h)
    assert [data for _, data in script.sends] == honest_bytes(h) and script.end == "ok"


def test_unknown_fields_are_only_additions() -> None:
    h = honest_stream()
    sent = [data for _, data in MODES["unknown_fields"][1](h).sends]
    parsed = [worker_pb2.PrefillResponse.FromString(d) for d in sent]
    for p in parsed:
        p.DiscardUnknownFields()
    assert parsed == [h.header, *h.chunks, h.first]


def test_pdserve_ignores_unknown_fields_in_prefill_messages() -> None:
    """Protobuf's rule: a receiver skips fields it does not know (a newer prefill
    worker may add one). Fails on main: a chunk message with an unknown field after
    the chunk is DATA_LOSS "holds neither header, chunk nor token"."""
    h = honest_stream()
    sent = [data for _, data in MODES["unknown_fields"][1](h).sends]
    try:
        events = [parse_prefill_response(d) for d in sent]
    except KVStreamError as e:
        pytest.fail(f"a valid message with unknown fields was refused: {e.code} {e}")
    assert [type(e).__name__ for e in events] == ["KVHeader", "KVChunk", "KVChunk", "FirstToken"]


def test_mode_comes_from_the_request_id() -> None:
    assert mode_of("chaos-00012~h=chunk_bad_crc") == "chunk_bad_crc"
    assert mode_of("chaos-00012") == "passthrough"
    assert mode_of("r~x=1~h=stall_after_header") == "stall_after_header"
