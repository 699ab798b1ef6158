"""What a KV stream must look like, checked on the receiving side before use.

The stream is: one header (the sender's model fingerprint), then chunks in
``seq`` order, each one layer of a token range, then the first token sampled
after the prompt. These three are the stream's domain events (``KVEvent``); only
pdserve/convert.py knows their protobuf form. The receiver checks the header
against its own model before accepting a byte, and every chunk's position,
sizes and CRC32C before writing it into its blocks. A violation raises
``KVStreamError`` carrying the gRPC status name to fail the request with.
"""

from __future__ import annotations

from dataclasses import dataclass

from pdserve.kvwire.codec import EncodedKV, Encoding, expected_sizes
from pdserve.logprobs import Logprob
from pdserve.sampling_params import SamplingParams

PROTOCOL_VERSION = 1


class KVStreamError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code  # a grpc.StatusCode name: FAILED_PRECONDITION, DATA_LOSS, ...


class PeerFailed(KVStreamError):
    """The sending peer failed the stream, or could not be reached (its status).
    Those that are the peer's own fault (UNAVAILABLE, silent, full: see
    pdserve/engine/kv_import.py::PEER_FAULTS) a receiver may answer by asking
    another peer or prefilling itself."""

    @property
    def unavailable(self) -> bool:
        return self.code == "UNAVAILABLE"


@dataclass(frozen=True)
class KVHeader:
    protocol_version: int
    model_name: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    encoding: Encoding
    num_tokens: int
    num_cached_tokens: int = 0
    """Leading tokens whose KV is not in the stream (the receiver holds it)."""


@dataclass(frozen=True)
class KVChunk:
    seq: int
    layer: int
    token_offset: int
    num_tokens: int
    encoding: Encoding
    payload: EncodedKV
    crc32c: int


@dataclass(frozen=True)
class FirstToken:
    """The stream's last event: the token sampled after the prompt."""

    token: Logprob
    prefill_compute_s: float = 0.0
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    """Prompt tokens the sender took from its prefix cache instead of computing."""


KVEvent = KVHeader | KVChunk | FirstToken


@dataclass(frozen=True)
class KVRequest:
    """What a receiver asks of a KV sender: prefill this prompt, stream its KV in
    ``encoding``, sample the first token with ``params``."""

    request_id: str
    prompt: list[int]
    params: SamplingParams
    encoding: Encoding
    num_cached_tokens: int = 0
    """Leading prompt tokens whose KV the receiver holds: not sent."""


class KVStreamValidator:
    """Checks one incoming stream against the receiver's model and the request."""

    def __init__(self, expected: KVHeader) -> None:
        self.expected = expected
        self.header: KVHeader | None = None
        self.next_seq = 0
        self.bytes_received = 0
        self._covered = [0] * expected.num_layers  # tokens received per layer, in order

    def check_header(self, h: KVHeader) -> None:
        e = self.expected
        if self.header is not None:
            raise KVStreamError("INVALID_ARGUMENT", "KV stream: a second header")
        if h.protocol_version != e.protocol_version:
            raise KVStreamError("FAILED_PRECONDITION", f"KV protocol version "
                                f"{h.protocol_version}, this worker speaks {e.protocol_version}")
        for field in ("model_name", "num_layers", "num_kv_heads", "head_dim", "block_size"):
            got, want = getattr(h, field), getattr(e, field)
            if got != want:
                raise KVStreamError("FAILED_PRECONDITION",
                                    f"KV header {field}={got!r} does not match this worker's "
                                    f"model ({field}={want!r})")
        if h.encoding != e.encoding:
            raise KVStreamError("FAILED_PRECONDITION", f"KV encoding {h.encoding.name} was "
                                f"not the one requested ({e.encoding.name})")
        if h.num_tokens != e.num_tokens:
            raise KVStreamError("INVALID_ARGUMENT", f"KV header announces {h.num_tokens} "
                                f"tokens, the prompt has {e.num_tokens}")
        if not 0 <= h.num_cached_tokens <= e.num_cached_tokens:
            raise KVStreamError("INVALID_ARGUMENT", f"KV header skips {h.num_cached_tokens} "
                                f"tokens, this worker holds {e.num_cached_tokens}")
        self._covered = [h.num_cached_tokens] * e.num_layers
        self.header = h

    def check_chunk(self, c: KVChunk) -> None:
        e = self.expected
        if self.header is None:
            raise KVStreamError("INVALID_ARGUMENT", "KV chunk before the header")
        if c.seq != self.next_seq:
            raise KVStreamError("DATA_LOSS", f"KV chunk seq {c.seq}, expected {self.next_seq} "
                                "(lost or out of order)")
        if c.encoding != e.encoding:
            raise KVStreamError("INVALID_ARGUMENT", f"KV chunk encoding {c.encoding.name}, "
                                f"stream is {e.encoding.name}")
        if not 0 <= c.layer < e.num_layers:
            raise KVStreamError("INVALID_ARGUMENT", f"KV chunk layer {c.layer} outside "
                                f"[0, {e.num_layers})")
        if c.token_offset != self._covered[c.layer] or c.num_tokens < 1 or \
                c.token_offset + c.num_tokens > e.num_tokens:
            raise KVStreamError("INVALID_ARGUMENT", f"KV chunk tokens [{c.token_offset}, "
                                f"{c.token_offset + c.num_tokens}) of layer {c.layer} out of "
                                f"order or outside the prompt ({e.num_tokens} tokens)")
        self._check_sizes(c)
        if c.payload.crc32c() != c.crc32c:
            raise KVStreamError("DATA_LOSS", f"KV chunk {c.seq} failed its CRC32C check")
        self._covered[c.layer] += c.num_tokens
        self.next_seq += 1
        self.bytes_received += c.payload.nbytes

    def _check_sizes(self, c: KVChunk) -> None:
        e = self.expected
        data, scales = expected_sizes(c.encoding, c.num_tokens, e.num_kv_heads, e.head_dim)
        p = c.payload
        sizes = (len(p.k), len(p.v), len(p.k_scales), len(p.v_scales))
        if sizes != (data, data, scales, scales):
            raise KVStreamError("INVALID_ARGUMENT", f"KV chunk {c.seq} has sizes {sizes}, "
                                f"expected {(data, data, scales, scales)} for {c.num_tokens} "
                                f"tokens (wrong shape or dtype)")

    def check_complete(self, first: FirstToken) -> None:
        """The first token ends the stream: every layer must be whole by then, and its
        count of cached prompt tokens within the prompt."""
        missing = [i for i, n in enumerate(self._covered) if n != self.expected.num_tokens]
        if self.header is None or missing:
            raise KVStreamError("DATA_LOSS", f"KV stream ended early: layers {missing[:5]} "
                                "incomplete" if missing else "KV stream ended before its header")
        if not 0 <= first.num_cached_tokens < self.expected.num_tokens:
            raise KVStreamError("INVALID_ARGUMENT", f"first token claims "
                                f"{first.num_cached_tokens} cached prompt tokens of "
                                f"{self.expected.num_tokens} (at most all but the last)")
