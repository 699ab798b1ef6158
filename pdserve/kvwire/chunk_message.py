"""``PrefillResponse{chunk}`` messages built and parsed without copying the KV.

The Prefill stream's KV chunks are the bulk of every disaggregated request. Going
through protobuf objects copies each payload three to five times per side (build,
serialize, parse, each field access); on loopback those copies cost more than the
socket. So chunk messages are written and read here in protobuf's wire format
directly:

- ``encode_chunk_message`` converts one layer's K/V straight into the message
  buffer (one pass), CRC32C over the payload, the CRC field last (a field may
  follow the others in any order).
- ``parse_chunk_message`` returns a ``KVChunk`` whose payload is a set of
  ``memoryview`` slices of the received bytes, or None when the message is not a
  chunk (the header and first token go through protobuf). Any valid protobuf
  encoding of a chunk parses (fields in any order, unknown fields skipped, the last
  of repeated fields wins); malformed bytes raise ``KVStreamError`` (DATA_LOSS).

Field numbers are those of ``proto/pdserve/v1/worker.proto``; a test checks both
directions against the protobuf library.
"""

from __future__ import annotations

import struct

import crc32c
import torch

from pdserve.kvwire.codec import EncodedKV, Encoding, WireRows, encode_into, expected_sizes
from pdserve.kvwire.stream import KVChunk, KVStreamError

_CHUNK = 2  # PrefillResponse.chunk
_OTHER_KINDS = (1, 3)  # PrefillResponse.header, .first_token
_INTS = {1: "seq", 2: "layer", 3: "token_offset", 4: "num_tokens", 5: "encoding"}
_PAYLOAD = {6: "k", 7: "v", 8: "k_scales", 9: "v_scales"}
_CRC = 10
_VARINT, _FIXED64, _LEN, _FIXED32 = 0, 1, 2, 5
_FIXED_SIZE = {_FIXED64: 8, _FIXED32: 4}


def varint(n: int) -> bytes:
    """Protobuf's base-128 varint."""
    out = bytearray()
    while n > 0x7F:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def encode_chunk_message(seq: int, layer: int, start: int, k: WireRows, v: WireRows,
                         encoding: Encoding) -> tuple[bytes, int]:
    """One layer's K/V (n, kvh, hd) → (serialized ``PrefillResponse{chunk}``, payload bytes)."""
    n, kvh, hd = k.shape
    data, scales = expected_sizes(encoding, n, kvh, hd)
    small = b"".join(varint(num << 3 | _VARINT) + varint(val) for num, val in
                     ((1, seq), (2, layer), (3, start), (4, n), (5, int(encoding))) if val)
    sizes = (data, data, scales, scales)
    tags = [varint(num << 3 | _LEN) + varint(size) if size else b""
            for num, size in zip(_PAYLOAD, sizes, strict=True)]
    body = len(small) + sum(map(len, tags)) + sum(sizes) + 5  # + CRC field
    head = varint(_CHUNK << 3 | _LEN) + varint(body)
    # torch.empty, not bytearray: no zero-fill of a buffer about to be overwritten
    buf = torch.empty(len(head) + body, dtype=torch.uint8).numpy().data
    head += small
    buf[:len(head)] = head
    pos, crc = len(head), 0
    parts = []
    for tag, size in zip(tags, sizes, strict=True):
        buf[pos:pos + len(tag)] = tag
        pos += len(tag)
        parts.append(buf[pos:pos + size])
        pos += size
    encode_into(k, encoding, parts[0], parts[2])
    encode_into(v, encoding, parts[1], parts[3])
    for part in parts:
        crc = crc32c.crc32c(part, crc)
    struct.pack_into("<BI", buf, pos, _CRC << 3 | _FIXED32, crc)
    return bytes(buf), sum(sizes)


def parse_chunk_message(data: bytes) -> KVChunk | None:
    """A serialized ``PrefillResponse`` → its chunk (payload views into ``data``), or
    None when it holds no chunk."""
    buf = memoryview(data)
    body = None
    for num, wire, value in _fields(buf):
        if num in _OTHER_KINDS:
            return None  # header, first token: protobuf parses those
        if num != _CHUNK:
            continue  # a field from a newer peer: skipped, as protobuf would
        if wire != _LEN:
            raise KVStreamError("DATA_LOSS", "KV message: chunk field is not a message")
        body = value
    return None if body is None else _chunk(body)


def _chunk(body: memoryview) -> KVChunk:
    ints = dict.fromkeys(_INTS.values(), 0)
    payload = dict.fromkeys(_PAYLOAD.values(), memoryview(b""))
    crc = 0
    for num, wire, value in _fields(body):
        if num in _INTS and wire == _VARINT:
            ints[_INTS[num]] = int(value)  # type: ignore[call-overload]
        elif num in _PAYLOAD and wire == _LEN:
            payload[_PAYLOAD[num]] = value  # type: ignore[assignment]
        elif num == _CRC and wire == _FIXED32:
            crc = int.from_bytes(value, "little")  # type: ignore[arg-type]
        elif num in _INTS or num in _PAYLOAD or num == _CRC:
            raise KVStreamError("DATA_LOSS", f"KV chunk field {num} has wire type {wire}")
    try:
        encoding = Encoding(ints["encoding"])
    except ValueError:
        raise KVStreamError("INVALID_ARGUMENT",
                            f"unknown KV encoding {ints['encoding']}") from None
    return KVChunk(ints["seq"], ints["layer"], ints["token_offset"], ints["num_tokens"],
                   encoding, EncodedKV(**payload), crc)  # type: ignore[arg-type]


def _fields(buf: memoryview):  # type: ignore[no-untyped-def]
    """Yields (field number, wire type, int or memoryview) over one message."""
    pos, end = 0, len(buf)
    while pos < end:
        key, pos = _readvarint(buf, pos)
        num, wire = key >> 3, key & 7
        if wire == _VARINT:
            value, pos = _readvarint(buf, pos)
            yield num, wire, value
            continue
        size = _FIXED_SIZE.get(wire)
        if wire == _LEN:
            size, pos = _readvarint(buf, pos)
        if size is None or pos + size > end:
            raise KVStreamError("DATA_LOSS", "KV message is malformed or truncated")
        yield num, wire, buf[pos:pos + size]
        pos += size


def _readvarint(buf: memoryview, pos: int) -> tuple[int, int]:
    result = shift = 0
    while pos < len(buf) and shift < 64:
        byte = buf[pos]
        result |= (byte & 0x7F) << shift
        pos += 1
        if not byte & 0x80:
            return result, pos
        shift += 7
    raise KVStreamError("DATA_LOSS", "KV message is malformed or truncated")
