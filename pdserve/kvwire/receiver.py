"""Receiving one KV stream: the header, then chunks (checked, decoded, handed to a
writer), then the first token once every layer is complete.

A peer that goes silent for ``idle_timeout_s`` between two events (the call's
start counts as one) fails the stream with ``PeerFailed`` DEADLINE_EXCEEDED: the
peer's fault, which the import may answer by asking another peer.

The decode worker's import (pdserve/engine/kv_import.py) writes into its KV blocks;
the wire benchmark into a plain tensor. Both run this loop over the same events.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, Callable
from contextlib import aclosing
from dataclasses import dataclass

import torch

from pdserve.kvwire.codec import decode
from pdserve.kvwire.stream import (
    FirstToken,
    KVChunk,
    KVEvent,
    KVHeader,
    KVStreamError,
    KVStreamValidator,
    PeerFailed,
)

KVWriter = Callable[[int, int, torch.Tensor, torch.Tensor], None]
"""Gets (layer, first token, K (n, kvh, hd), V): views of the received bytes, read-only."""


@dataclass
class TransferStats:
    prefill_compute_s: float = 0.0
    """Inside the sender, its first step to its first token."""
    transfer_s: float = 0.0
    """First chunk received to the first token."""
    bytes: int = 0
    """Payload bytes received."""


async def receive_kv(events: AsyncGenerator[KVEvent, None], validator: KVStreamValidator,
                     write: KVWriter, idle_timeout_s: float | None = None,
                     ) -> tuple[FirstToken, TransferStats]:
    """Consume ``events`` up to the first token; raises ``KVStreamError`` on a bad or
    short stream, ``PeerFailed`` DEADLINE_EXCEEDED when no event comes for
    ``idle_timeout_s`` (None: wait as long as the call lasts). The events are closed
    (their call cancelled) whatever happens."""
    e = validator.expected
    t0: float | None = None
    async with aclosing(events):
        while (event := await _next(events, idle_timeout_s)) is not None:
            if isinstance(event, KVHeader):
                validator.check_header(event)
            elif isinstance(event, KVChunk):
                t0 = t0 or time.perf_counter()
                validator.check_chunk(event)
                k, v = decode(event.payload, event.encoding, event.num_tokens,
                              e.num_kv_heads, e.head_dim)
                write(event.layer, event.token_offset, k, v)
            else:
                validator.check_complete()
                elapsed = time.perf_counter() - t0 if t0 else 0.0
                return event, TransferStats(event.prefill_compute_s, elapsed,
                                            validator.bytes_received)
    raise KVStreamError("DATA_LOSS", "prefill stream ended without a first token")


async def _next(events: AsyncGenerator[KVEvent, None],
                idle_timeout_s: float | None) -> KVEvent | None:
    """The next event, None at the end. The timeout cancels the peer's generator
    where it waits (its call is cancelled with it)."""
    timeout = asyncio.timeout(idle_timeout_s)
    try:
        async with timeout:
            return await anext(events)
    except StopAsyncIteration:
        return None
    except TimeoutError:
        if not timeout.expired():
            raise  # the peer's own TimeoutError, not the idle timeout
        raise PeerFailed("DEADLINE_EXCEEDED",
                         f"sent nothing for {idle_timeout_s:g} s (kv_idle_timeout_s)") from None
