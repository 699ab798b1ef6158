"""Exported KV leaves the device here: a private host copy of each layer's K/V.

On CPU a copy is a clone (the wire encoding is applied later, by the encoder). On
CUDA the forward pass must not wait for the wire, so each layer's K/V are first put
in the wire's form on the GPU (the wire dtype, or int8 + scales: fewer bytes over
PCIe, no float pass on the host), then go device → host on a side stream into
pinned buffers (torch's caching host allocator: page-locked, reused once the copy
that used them is done), while the compute stream goes on with the next layer::

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

from pdserve.kvwire.codec import Encoding, Int8Rows, WireRows, to_wire


class HostStaging:
    """Makes the private host copies of one engine's exported K/V."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._stream: Any = torch.cuda.Stream(device) if device.type == "cuda" else None

    def stage(self, k: torch.Tensor, v: torch.Tensor, wire: Encoding
              ) -> tuple[WireRows, WireRows, Any]:
        """Host copies of K/V (n, kvh, hd) — on CUDA already in ``wire``'s form — and the
        CUDA event that marks them written (None: written already). Called inside the
        forward pass, right after the layer produced them: the copy is ordered after
        that and nothing after it."""
        if self._stream is None:
            return k.clone(), v.clone(), None
        wk, wv = to_wire(k, wire), to_wire(v, wire)  # on the compute stream
        produced = torch.cuda.Event()
        produced.record()
        with torch.cuda.stream(self._stream):
            self._stream.wait_event(produced)
            hk, hv = self._to_host(wk), self._to_host(wv)
            done = torch.cuda.Event()
            done.record(self._stream)
        return hk, hv, done

    def _to_host(self, x: WireRows) -> WireRows:
        if isinstance(x, Int8Rows):
            return Int8Rows(self._copy(x.q), self._copy(x.scale))
        return self._copy(x)

    def _copy(self, x: torch.Tensor) -> torch.Tensor:
        """A pinned host copy of ``x``, queued on the copy stream (current here)."""
        host = torch.empty(x.shape, dtype=x.dtype, pin_memory=True)
        host.copy_(x, non_blocking=True)
        # The compute stream may free x before the copy ran: keep its memory out of
        # reuse until the copy stream is past this point.
        x.record_stream(self._stream)
        return host


async def wait_ready(done: Any) -> None:
    """Return once a staged copy's ``done`` event fired (None: at once)."""
    if done is not None and not done.query():
        await asyncio.to_thread(done.synchronize)
