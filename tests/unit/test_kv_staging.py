"""Exported KV leaves the engine as a private host copy (kv_staging.py): on the CPU a
clone that is ready at once; the CUDA path (pinned buffers, a copy stream) is
tests/gpu's."""

from __future__ import annotations

import asyncio

import torch

from pdserve.engine.async_engine import KVPiece
from pdserve.engine.kv_staging import HostStaging


def test_cpu_staging_is_a_private_copy_ready_at_once() -> None:
    x = torch.randn(8, 4, 16)
    k, v = x[:, :2], x[:, 2:]  # views of one buffer, as the forward pass hands them over
    hk, hv, done = HostStaging(torch.device("cpu")).stage(k, v)
    assert done is None
    want = x.clone()
    x.fill_(0.0)  # the engine reuses its buffers: the staged copy must not change
    assert torch.equal(hk, want[:, :2]) and torch.equal(hv, want[:, 2:])
    piece = KVPiece(0, 0, hk, hv, done)
    asyncio.run(asyncio.wait_for(piece.ready(), 1.0))
