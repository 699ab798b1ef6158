"""Receiving one KV stream: the header, then chunks (checked, decoded, checked finite,
handed to a writer), then the first token once every layer is complete.

A peer that goes silent for ``idle_timeout_s`` between two events (the call's
start counts as one) is asked whether it is alive (``still_alive``: its health
probe). Alive (busy: a prefill queued behind others sends its header, then
nothing until it is scheduled) it gets another ``idle_timeout_s``; silent or
dead (SIGSTOP, a wedged process, no such service) it fails the stream with
``PeerFailed`` DEADLINE_EXCEEDED: the peer's fault, which the import may answer
by asking another peer.

The decode worker's import (pdserve/engine/kv_import.py) writes into its KV blocks;
the wire benchmark into a plain tensor. Both run this loop over the same events.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, Awaitable, Callable
from contextlib import aclosing, suppress
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
Liveness = Callable[[], Awaitable[bool]]
"""Whether the peer is alive (its health probe answered SERVING in time)."""


@dataclass
class TransferStats:
    prefill_compute_s: float = 0.0
    """Inside the sender, its first step to its first token."""
    transfer_s: float = 0.0
    """First chunk received to the first token."""
    bytes: int = 0
    """Payload bytes received."""
    num_cached_tokens: int = 0
    """Prompt tokens the sender took from its prefix cache instead of computing."""


async def receive_kv(events: AsyncGenerator[KVEvent, None], validator: KVStreamValidator,
                     write: KVWriter, idle_timeout_s: float | None = None,
                     still_alive: Liveness | None = None,
                     max_silent_s: float | None = None) -> tuple[FirstToken, TransferStats]:
    """Consume ``events`` up to the first token; raises ``KVStreamError`` on a bad or
    short stream, ``PeerFailed`` DEADLINE_EXCEEDED when no event comes for
    ``idle_timeout_s`` (None: wait as long as the call lasts) and the peer is not
    ``still_alive`` (None: not asked), or when it stays silent for ``max_silent_s``
    even though it says it lives (a wedged stream behind a healthy health service).
    The events are closed (their call cancelled) whatever happens."""
    e = validator.expected
    t0: float | None = None
    async with aclosing(events):
        while (event := await _next(events, idle_timeout_s, still_alive,
                                    max_silent_s)) is not None:
            if isinstance(event, KVHeader):
                validator.check_header(event)
            elif isinstance(event, KVChunk):
                t0 = t0 or time.perf_counter()
                validator.check_chunk(event)
                k, v = decode(event.payload, event.encoding, event.num_tokens,
                              e.num_kv_heads, e.head_dim)
                _check_finite(event, k, v)
                write(event.layer, event.token_offset, k, v)
            else:
                validator.check_complete(event)
                elapsed = time.perf_counter() - t0 if t0 else 0.0
                return event, TransferStats(event.prefill_compute_s, elapsed,
                                            validator.bytes_received, event.num_cached_tokens)
    raise KVStreamError("DATA_LOSS", "prefill stream ended without a first token")


async def _next(events: AsyncGenerator[KVEvent, None], idle_timeout_s: float | None,
                still_alive: Liveness | None, max_silent_s: float | None) -> KVEvent | None:
    """The next event, None at the end. The wait runs in a task of its own so that
    asking the peer whether it lives does not cancel it; giving up cancels the
    peer's generator where it waits (its call with it)."""
    if idle_timeout_s is None:
        return await anext(events, None)
    pending = asyncio.ensure_future(anext(events, None))
    silent_since = time.monotonic()
    try:
        while not (await asyncio.wait({pending}, timeout=idle_timeout_s))[0]:
            if still_alive is None or not await still_alive():
                raise PeerFailed("DEADLINE_EXCEEDED", f"sent nothing for {idle_timeout_s:g} s "
                                 "and does not answer its health probe (kv_idle_timeout_s)")
            silent = time.monotonic() - silent_since
            if max_silent_s is not None and silent >= max_silent_s:
                raise PeerFailed("DEADLINE_EXCEEDED", f"answers its health probe but sent "
                                 f"nothing for {silent:.1f} s")
        return pending.result()
    finally:
        if not pending.done():
            pending.cancel()
            with suppress(asyncio.CancelledError, Exception):
                await pending  # the generator must stop before it can be closed


def _check_finite(c: KVChunk, k: torch.Tensor, v: torch.Tensor) -> None:
    """NaN or Inf in K/V (a valid CRC proves only that the sender meant it) would turn
    this request's attention into NaN: refuse the stream. One fp32 sum per tensor and
    one host sync: a sum is non-finite iff an element is (or the sum overflows, which
    real KV never comes near), and it runs several times faster than
    ``isfinite(x).all()``, which materializes a bool per element (bf16: 7x here)."""
    total = k.sum(dtype=torch.float32) + v.sum(dtype=torch.float32)
    if not bool(torch.isfinite(total)):
        raise KVStreamError("DATA_LOSS", f"KV chunk {c.seq} (layer {c.layer}) holds "
                            "non-finite values (NaN or Inf)")
