"""What a hostile prefill peer can do to a KV stream: one named mode per malformation.

A mode takes the honest stream (the messages a real prefill worker sent for this
request, as ``PrefillResponse`` objects) and returns a ``Script``: the raw bytes to
send, each optionally after a pause, then how the call ends (OK, a status, or a
stall that lasts until the caller gives up). Raw bytes, not protobuf objects, so a
mode can send what protobuf would never build: unknown fields, wrong wire types,
garbage, a message larger than gRPC's limit.

Every mode is in ``MODES`` with what the issue demands of a decode worker that gets
it (``Expect``):

- ``RECOVER``: the peer is broken, not lying (stalls, UNAVAILABLE,
  RESOURCE_EXHAUSTED, slow but correct, unknown fields): the request completes with
  exactly the tokens of an undisturbed run (retry another prefill worker, else
  prefill locally).
- ``REJECT``: the data is hostile: the request ends with a clear status (not UNKNOWN
  or INTERNAL) that names the prefill side, or completes identically; never with
  other tokens, and later requests on that worker are unaffected.

Torch-free on purpose: the peer is a small process that starts in a second.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import crc32c
import numpy as np

from pdserve._proto.pdserve.v1 import common_pb2, worker_pb2

Response = worker_pb2.PrefillResponse
HUGE_BYTES = 65 * 1024 * 1024  # above pdserve's 64 MiB message limit


class Expect(enum.Enum):
    RECOVER = "recover"
    REJECT = "reject"


@dataclass
class Script:
    """What the peer sends: ``(pause_s, bytes)`` in order, then ``end``: "ok",
    "stall" (silent until the caller cancels), or a gRPC status name to abort with."""

    sends: list[tuple[float, bytes]] = field(default_factory=list)
    end: str = "ok"
    details: str = "hostile prefill peer"

    def add(self, data: bytes | Response, pause_s: float = 0.0) -> Script:
        self.sends.append((pause_s, data if isinstance(data, bytes)
                           else data.SerializeToString()))
        return self


@dataclass(frozen=True)
class Honest:
    """The honest stream of one request, split by kind."""

    header: Response
    chunks: list[Response]
    first: Response
    vocab_size: int

    @staticmethod
    def of(messages: list[Response], vocab_size: int) -> Honest:
        kinds = [m.WhichOneof("kind") for m in messages]
        if kinds.count("header") != 1 or kinds[-1] != "first_token":
            raise ValueError(f"upstream stream is not header, chunks, first token: {kinds}")
        return Honest(messages[0], messages[1:-1], messages[-1], vocab_size)

    def copy(self, m: Response) -> Response:
        out = Response()
        out.CopyFrom(m)
        return out

    def script(self, chunks: Sequence[Response | bytes] | None = None, header: Response | None = None,
               first: Response | bytes | None = None) -> Script:
        s = Script().add(header if header is not None else self.header)
        for c in self.chunks if chunks is None else chunks:
            s.add(c)
        return s.add(first if first is not None else self.first)


# -- wire helpers -------------------------------------------------------------------


def varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def nested(num: int, body: bytes) -> bytes:
    """Field ``num`` (length-delimited) holding ``body``."""
    return varint(num << 3 | 2) + varint(len(body)) + body


UNKNOWN_FIELDS = (varint(99 << 3 | 0) + varint(12345) + nested(100, b"unknown payload") +
                  varint(101 << 3 | 5) + b"\x01\x02\x03\x04")


def crc_of(c: worker_pb2.KVChunk) -> int:
    crc = 0
    for part in (c.k, c.v, c.k_scales, c.v_scales):
        crc = crc32c.crc32c(part, crc)
    return crc


def recrc(m: Response) -> Response:
    m.chunk.crc32c = crc_of(m.chunk)
    return m


_NONFINITE = {  # encoding → (dtype of the values, NaN bits, Inf bits) as that dtype
    common_pb2.KV_ENCODING_FP32: (np.float32, np.float32("nan"), np.float32("inf")),
    common_pb2.KV_ENCODING_BF16: (np.uint16, np.uint16(0x7FC0), np.uint16(0x7F80)),
    common_pb2.KV_ENCODING_FP16: (np.uint16, np.uint16(0x7E00), np.uint16(0x7C00)),
}


def poisoned(m: Response, what: str) -> Response:
    """Every 7th K and V value (int8: every scale) NaN or Inf, with a valid CRC."""
    c = m.chunk
    if c.encoding == common_pb2.KV_ENCODING_INT8:
        value = np.float32("nan" if what == "nan" else "inf")
        for name in ("k_scales", "v_scales"):
            a = np.frombuffer(getattr(c, name), np.float32).copy()
            a[:] = value
            setattr(c, name, a.tobytes())
        return recrc(m)
    dtype, nan, inf = _NONFINITE[c.encoding]
    for name in ("k", "v"):
        a = np.frombuffer(getattr(c, name), dtype).copy()
        a[::7] = nan if what == "nan" else inf  # type: ignore[call-overload]
        setattr(c, name, a.tobytes())
    return recrc(m)


# -- the modes ------------------------------------------------------------------------


def _header(**change: int | str) -> Callable[[Honest], Script]:
    def mode(h: Honest) -> Script:
        header = h.copy(h.header)
        for k, v in change.items():
            value = getattr(header.header, k) + v if isinstance(v, int) else v
            setattr(header.header, k, value)
        return h.script(header=header)
    return mode


def _chunk(edit: Callable[[worker_pb2.KVChunk], None], crc: bool = True,
           index: int = 0) -> Callable[[Honest], Script]:
    """Edit chunk ``index`` (and re-CRC it unless ``crc`` is False)."""
    def mode(h: Honest) -> Script:
        chunks = [h.copy(c) for c in h.chunks]
        edit(chunks[index].chunk)
        if crc:
            recrc(chunks[index])
        return h.script(chunks=list(chunks))
    return mode


def _chunks(edit: Callable[[Honest, list[Response]], list[Response | bytes]],
            ) -> Callable[[Honest], Script]:
    return lambda h: h.script(chunks=edit(h, [h.copy(c) for c in h.chunks]))


def _reseq(chunks: list[Response | bytes]) -> list[Response | bytes]:
    for i, c in enumerate(chunks):
        if isinstance(c, Response):
            recrc(c).chunk.seq = i
    return chunks


def _duplicate(h: Honest, cs: list[Response]) -> list[Response | bytes]:
    return [cs[0], h.copy(cs[0]), *cs[1:]]


def _overlap(h: Honest, cs: list[Response]) -> list[Response | bytes]:
    """A second chunk of layer 0 covering the first token again, seq renumbered."""
    extra = h.copy(cs[0])
    return _reseq([cs[0], extra, *cs[1:]])


def _swap(h: Honest, cs: list[Response]) -> list[Response | bytes]:
    return [cs[1], cs[0], *cs[2:]] if len(cs) > 1 else list(cs)


def _swap_reseq(h: Honest, cs: list[Response]) -> list[Response | bytes]:
    """Layers out of order with seq numbers that look right."""
    return _reseq([cs[1], cs[0], *cs[2:]]) if len(cs) > 1 else list(cs)


def _first(token_id: int | None = None,
           raw_token: bytes | None = None) -> Callable[[Honest], Script]:
    def mode(h: Honest) -> Script:
        if raw_token is not None:  # TokenLogprob.token_id as protobuf would never write it
            body = nested(1, raw_token)
            return h.script(first=nested(3, body))
        first = h.copy(h.first)
        if token_id is not None:
            first.first_token.token.token_id = token_id if token_id >= 0 else h.vocab_size
        return h.script(first=first)
    return mode


def _with_unknown_fields(h: Honest) -> Script:
    s = Script()
    for m in [h.header, *h.chunks, h.first]:
        kind = m.WhichOneof("kind")
        num = {"header": 1, "chunk": 2, "first_token": 3}[kind or ""]
        inner = getattr(m, kind or "").SerializeToString() + UNKNOWN_FIELDS
        s.add(nested(num, inner) + UNKNOWN_FIELDS)
    return s


def _slow(h: Honest) -> Script:
    s = Script()
    for m in [h.header, *h.chunks, h.first]:
        s.add(m, pause_s=0.05)
    return s


def _stall(after_chunks: int | None) -> Callable[[Honest], Script]:
    def mode(h: Honest) -> Script:
        s = Script(end="stall")
        if after_chunks is None:
            return s
        s.add(h.header)
        for c in h.chunks[:after_chunks]:
            s.add(c)
        return s
    return mode


def _abort(code: str, after_chunks: int = 0) -> Callable[[Honest], Script]:
    def mode(h: Honest) -> Script:
        s = Script(end=code, details=f"hostile prefill peer says {code}")
        if after_chunks:
            s.add(h.header)
            for c in h.chunks[:after_chunks]:
                s.add(c)
        return s
    return mode


def _nan_logprob(h: Honest) -> Script:
    first = h.copy(h.first)
    first.first_token.token.logprob = float("nan")
    first.first_token.prefill_compute_s = float("-inf")
    first.first_token.num_prompt_tokens = 2**31
    return h.script(first=first)


def _huge(h: Honest) -> Script:
    c = h.copy(h.chunks[0])
    c.chunk.k = bytes(HUGE_BYTES)
    return h.script(chunks=[recrc(c), *h.chunks[1:]])


def _truncate(c: worker_pb2.KVChunk) -> None:
    c.k, c.v = c.k[: len(c.k) // 2], c.v[: len(c.v) // 2]


def _garbage(h: Honest) -> Script:
    return h.script(chunks=[b"\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01garbage",
                            *h.chunks[1:]])


def _wrong_wire_type(h: Honest) -> Script:
    # chunk.seq (field 1) sent length-delimited instead of as a varint
    body = nested(1, b"\x00") + h.chunks[0].chunk.SerializeToString()
    return h.script(chunks=[nested(2, body), *h.chunks[1:]])


MODES: dict[str, tuple[Expect, Callable[[Honest], Script]]] = {
    # honest peers that are slow, silent, down or full: the request must still complete
    "passthrough": (Expect.RECOVER, lambda h: h.script()),
    "unknown_fields": (Expect.RECOVER, _with_unknown_fields),
    "slow_drip": (Expect.RECOVER, _slow),
    "stall_before_header": (Expect.RECOVER, _stall(None)),
    "stall_after_header": (Expect.RECOVER, _stall(0)),
    "stall_mid_stream": (Expect.RECOVER, _stall(1)),
    "unavailable": (Expect.RECOVER, _abort("UNAVAILABLE")),
    "unavailable_mid_stream": (Expect.RECOVER, _abort("UNAVAILABLE", after_chunks=1)),
    "resource_exhausted": (Expect.RECOVER, _abort("RESOURCE_EXHAUSTED")),
    # hostile data: a clear status naming the prefill side
    "header_model_name": (Expect.REJECT, _header(model_name="not-this-model")),
    "header_num_layers": (Expect.REJECT, _header(num_layers=1)),
    "header_num_kv_heads": (Expect.REJECT, _header(num_kv_heads=1)),
    "header_head_dim": (Expect.REJECT, _header(head_dim=8)),
    "header_block_size": (Expect.REJECT, _header(block_size=16)),
    "header_protocol_version": (Expect.REJECT, _header(protocol_version=98)),
    "header_encoding": (Expect.REJECT, _header(encoding=1)),
    "header_num_tokens": (Expect.REJECT, _header(num_tokens=1)),
    "no_header": (Expect.REJECT, lambda h: Script(sends=h.script().sends[1:])),
    "double_header": (Expect.REJECT, lambda h: h.script(chunks=[h.header, *h.chunks])),
    "chunk_seq_skip": (Expect.REJECT, _chunk(lambda c: setattr(c, "seq", c.seq + 1))),
    "chunks_swapped": (Expect.REJECT, _chunks(_swap)),
    "chunks_swapped_reseq": (Expect.REJECT, _chunks(_swap_reseq)),
    "chunk_duplicate": (Expect.REJECT, _chunks(_duplicate)),
    "chunk_overlap": (Expect.REJECT, _chunks(_overlap)),
    "chunk_offset_beyond": (Expect.REJECT, _chunk(lambda c: setattr(c, "token_offset", 4096))),
    "chunk_layer_out_of_range": (Expect.REJECT, _chunk(lambda c: setattr(c, "layer", 1000))),
    "chunk_zero_tokens": (Expect.REJECT, _chunk(lambda c: setattr(c, "num_tokens", 0))),
    "chunk_tokens_overflow": (Expect.REJECT,
                              _chunk(lambda c: setattr(c, "num_tokens", 2**32 - 1))),
    "chunk_short_k": (Expect.REJECT, _chunk(lambda c: setattr(c, "k", c.k[:-1]))),
    "chunk_truncated_payload": (Expect.REJECT, _chunk(_truncate)),
    "chunk_unknown_encoding": (Expect.REJECT, _chunk(lambda c: setattr(c, "encoding", 57))),
    "chunk_bad_crc": (Expect.REJECT,
                      _chunk(lambda c: setattr(c, "crc32c", c.crc32c ^ 1), crc=False)),
    "chunk_nan_valid_crc": (Expect.REJECT, _chunks(lambda h, cs: [poisoned(cs[0], "nan"),
                                                                  *cs[1:]])),
    "chunk_inf_valid_crc": (Expect.REJECT, _chunks(lambda h, cs: [poisoned(cs[0], "inf"),
                                                                  *cs[1:]])),
    "chunk_garbage_bytes": (Expect.REJECT, _garbage),
    "chunk_wrong_wire_type": (Expect.REJECT, _wrong_wire_type),
    "huge_message": (Expect.REJECT, _huge),
    "missing_layers": (Expect.REJECT, lambda h: h.script(chunks=h.chunks[:1])),
    "first_token_missing": (Expect.REJECT, lambda h: Script(sends=h.script().sends[:-1])),
    "first_token_before_chunks": (Expect.REJECT, lambda h: h.script(chunks=[h.first])),
    "first_token_vocab_size": (Expect.REJECT, _first(token_id=-1)),
    "first_token_uint32_max": (Expect.REJECT, _first(token_id=2**32 - 1)),
    "first_token_negative_varint": (Expect.REJECT,
                                    _first(raw_token=varint(1 << 3) + varint(2**64 - 1))),
    "first_token_nan_logprob": (Expect.REJECT, _nan_logprob),
    "empty_stream": (Expect.REJECT, lambda h: Script()),
}


def mode_of(request_id: str) -> str:
    """The mode a request id asks for: ``...~h=MODE`` (else passthrough)."""
    for part in request_id.split("~")[1:]:
        if part.startswith("h="):
            return part[2:]
    return "passthrough"
