"""Exported KV leaves the engine as a private host copy (kv_staging.py): on the CPU a
clone that is ready at once; the CUDA path (pinned buffers, a copy stream) is
tests/gpu's."""

from __future__ import annotations

import asyncio

import torch

from pdserve.engine.async_engine import KVPiece
from pdserve.engine.kv_staging import HostStaging
from pdserve.kvwire.codec import Encoding, Int8Rows, encode, quantize_int8, to_wire


def test_cpu_staging_is_a_private_copy_ready_at_once() -> None:
    x = torch.randn(8, 4, 16)
    k, v = x[:, :2], x[:, 2:]  # views of one buffer, as the forward pass hands them over
    hk, hv, done = HostStaging(torch.device("cpu")).stage(k, v, Encoding.INT8)
    assert done is None  # the encoder applies the wire encoding later, on the host
    want = x.clone()
    x.fill_(0.0)  # the engine reuses its buffers: the staged copy must not change
    assert torch.equal(hk, want[:, :2]) and torch.equal(hv, want[:, 2:])
    piece = KVPiece(0, 0, hk, hv, done)
    asyncio.run(asyncio.wait_for(piece.ready(), 1.0))


def test_rows_in_the_wire_form_encode_to_the_same_bytes() -> None:
    """What a GPU stages (to_wire: wire dtype, or int8 + scales) encodes to exactly the
    bytes the host encoder makes from the float rows."""
    k, v = torch.randn(5, 2, 8), torch.randn(5, 2, 8) * 40
    for enc in (Encoding.BF16, Encoding.FP16, Encoding.FP32, Encoding.INT8):
        assert encode(to_wire(k, enc), to_wire(v, enc), enc) == encode(k, v, enc)
    rows = quantize_int8(v)
    assert isinstance(rows, Int8Rows) and rows.q.dtype == torch.int8 and rows.shape == v.shape
    torch.testing.assert_close(rows.q.float() * rows.scale.unsqueeze(-1), v, atol=0.5, rtol=0.02)
