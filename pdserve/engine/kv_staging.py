"""Exported KV leaves the device here: a private host copy of each layer's K/V.

On CPU a copy is a clone. On CUDA the forward pass must not wait for the wire, so
each layer's K/V go device → host on a side stream, into pinned buffers (torch's
caching host allocator: page-locked, reused once the copy that used them is done),
while the compute stream goes on with the next layer::

    compute stream:  layer i ──event──▶ layer i+1 ──▶ layer i+2 …
                                  │
    copy stream:                  └─wait─▶ copy K/V of layer i to pinned host ──done

A staged piece is READY once its ``done`` event fired; readers wait on it
(``wait_ready``) without holding the engine thread or the event loop.
"""

from __future__ import annotations

import asyncio
from typing import Any

import torch


class HostStaging:
    """Makes the private host copies of one engine's exported K/V."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._stream: Any = torch.cuda.Stream(device) if device.type == "cuda" else None

    def stage(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, Any]:
        """Host copies of K/V (n, kvh, hd) and the CUDA event that marks them written
        (None: written already). Called inside the forward pass, right after the layer
        produced them: the copy is ordered after that and nothing after it."""
        if self._stream is None:
            return k.clone(), v.clone(), None
        produced = torch.cuda.Event()
        produced.record()  # on the compute (current) stream
        hk = torch.empty(k.shape, dtype=k.dtype, pin_memory=True)  # (n, kvh, hd)
        hv = torch.empty(v.shape, dtype=v.dtype, pin_memory=True)
        with torch.cuda.stream(self._stream):
            self._stream.wait_event(produced)
            hk.copy_(k, non_blocking=True)
            hv.copy_(v, non_blocking=True)
            done = torch.cuda.Event()
            done.record(self._stream)
        # The compute stream may free k and v before the copy ran: keep their memory
        # out of reuse until the copy stream is past this point.
        k.record_stream(self._stream)
        v.record_stream(self._stream)
        return hk, hv, done


async def wait_ready(done: Any) -> None:
    """Return once a staged copy's ``done`` event fired (None: at once)."""
    if done is not None and not done.query():
        await asyncio.to_thread(done.synchronize)
