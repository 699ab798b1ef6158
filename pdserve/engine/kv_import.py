"""One request's KV import on the decode side: its prompt's KV comes from a peer,
or from the next one when a peer fails it.

States (each import is in exactly one)::

    RESERVED ──run──▶ RECEIVING ──first token──────────────────────────────▶ COMMITTED
       ▲                  ├──peer's fault, another peer to ask─▶ (_retry) ─┘ back to RESERVED
                          ├──peer's fault, none left, fallback allowed──────▶ FELL_BACK
                          └──anything else──────────────────────────────────▶ ABORTED

- RESERVED: the engine holds blocks for the prompt (and its first token) in an
  IMPORTING request; nothing written yet (or, after ``_retry``, nothing that can
  survive: see below).
- RECEIVING: every event is checked (``KVStreamValidator``); each chunk is decoded,
  must be finite (else DATA_LOSS) and is written into those blocks on the engine thread.
  Blocks the prefix cache supplied (``num_cached_tokens``) are shared with other
  requests: the sender is asked not to send them, and rows for them are dropped.
- COMMITTED: every layer complete, the first token known (and inside the
  vocabulary, else ABORTED with INVALID_ARGUMENT): the request joins the decode
  batch; its blocks are freed when it finishes.
- ``_retry``: the peer failed the stream and it was its own fault (``PEER_FAULTS``:
  unreachable or died, silent for ``idle_timeout_s`` and not answering its health
  probe (``still_alive``), full, message too large, its own deadline) and another
  peer is left to ask. The blocks stay reserved (so no other request takes them
  meanwhile); the next stream gets a fresh validator, which commits only once it
  has covered every token of every layer,
  so every slot the failed stream wrote is written again before anything reads it
  (writes run on the engine thread in the order they were queued).
- FELL_BACK: the last peer failed that way too and the caller allowed it: the
  reserved blocks are freed, what arrived is dropped, the prompt is prefilled
  here (the request waits like any other); blocks freed at finish.
- ABORTED: a bad stream (hostile data: FAILED_PRECONDITION, DATA_LOSS,
  INVALID_ARGUMENT, never retried), another peer status, or cancellation: the
  request is aborted in the engine, which frees its blocks; the error propagates.

An import never run is freed with its request: closing the ``RequestStream`` of an
unfinished request aborts it.

``run`` drives the machine over streams of ``KVEvent``; each arrow is one method.
``failures`` lists the peer failures met on the way, one per stream given up.
"""

from __future__ import annotations

import enum
from collections.abc import AsyncGenerator, Sequence
from typing import TYPE_CHECKING

import torch

from pdserve.kvwire.codec import bytes_per_token
from pdserve.kvwire.receiver import Liveness, TransferStats, receive_kv
from pdserve.kvwire.stream import (
    FirstToken,
    KVEvent,
    KVHeader,
    KVStreamError,
    KVStreamValidator,
    PeerFailed,
)

if TYPE_CHECKING:
    from pdserve.engine.async_engine import AsyncEngine


# A peer that fails a stream with one of these is at fault, not the data: ask another.
PEER_FAULTS = frozenset({"UNAVAILABLE", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED",
                         "ABORTED", "CANCELLED"})


class ImportState(enum.Enum):
    RESERVED = "reserved"
    RECEIVING = "receiving"
    COMMITTED = "committed"
    FELL_BACK = "fell_back"
    ABORTED = "aborted"


class KVImport:
    """Handed out by ``RequestStream.reserve_import`` once the blocks are reserved."""

    def __init__(self, engine: AsyncEngine, request_id: str, expected: KVHeader,
                 want_logprobs: bool) -> None:
        self.engine = engine
        self.request_id = request_id
        self.state = ImportState.RESERVED
        self.stats = TransferStats()
        self.failures: list[PeerFailed] = []  # one per stream given up, in order
        self._expected = expected
        self._want_logprobs = want_logprobs
        self._validator: KVStreamValidator | None = None  # the stream being received

    @property
    def num_cached_tokens(self) -> int:
        """Leading prompt tokens this engine's prefix cache holds: a sender need not send
        them (``KVRequest.num_cached_tokens``)."""
        return self._expected.num_cached_tokens

    @property
    def bytes_pending(self) -> int:
        """KV payload bytes still to arrive: all of them while RESERVED, what the
        stream has not delivered while RECEIVING, none after."""
        if self.state not in (ImportState.RESERVED, ImportState.RECEIVING):
            return 0
        e = self._expected
        total = (e.num_tokens - e.num_cached_tokens) * bytes_per_token(
            e.encoding, e.num_layers, e.num_kv_heads, e.head_dim)
        got = self._validator.bytes_received if self._validator is not None else 0
        return max(total - got, 0)

    @property
    def error(self) -> PeerFailed | None:
        """The last peer failure (why it fell back), if any."""
        return self.failures[-1] if self.failures else None

    async def run(self, events: AsyncGenerator[KVEvent, None], fall_back: bool,
                  retries: Sequence[AsyncGenerator[KVEvent, None]] = (),
                  idle_timeout_s: float | None = None,
                  still_alive: Sequence[Liveness] = (),
                  max_silent_s: float | None = None) -> None:
        """Receive ``events`` into the reserved blocks and commit. A stream the peer
        fails by its own fault is followed by the next of ``retries``, then by a local
        prefill when ``fall_back``; anything else aborts and raises. ``still_alive[i]``
        asks stream i's peer whether it lives when it is silent for ``idle_timeout_s``
        (none given: silent is failed); one alive but silent for ``max_silent_s`` has
        failed too. Streams not started are closed."""
        streams = [events, *retries]
        try:
            await self._receive_first_good(streams, fall_back, idle_timeout_s, still_alive,
                                           max_silent_s)
        except BaseException:  # bad stream, cancelled call: no block may stay reserved
            self._abort()
            raise
        finally:
            for unused in streams:
                await unused.aclose()  # a no-op on one already run

    async def _receive_first_good(self, streams: list[AsyncGenerator[KVEvent, None]],
                                  fall_back: bool, idle_timeout_s: float | None,
                                  still_alive: Sequence[Liveness],
                                  max_silent_s: float | None) -> None:
        for i, events in enumerate(streams):
            self._receiving()
            validator = self._validator = KVStreamValidator(self._expected)
            alive = still_alive[i] if i < len(still_alive) else None
            try:  # receive_kv closes the stream (cancels its call) whatever happens
                first, self.stats = await receive_kv(events, validator, self._write,
                                                     idle_timeout_s, alive, max_silent_s)
            except PeerFailed as e:
                if e.code not in PEER_FAULTS:
                    raise
                self.failures.append(e)
                if i + 1 < len(streams):
                    self._retry()
                    continue
                if not fall_back:
                    raise
                await self._fall_back()
                return
            await self._commit(first)
            return

    # --- transitions ---------------------------------------------------------------
    def _receiving(self) -> None:
        assert self.state is ImportState.RESERVED, self.state
        self.state = ImportState.RECEIVING

    def _write(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        skip = self._expected.num_cached_tokens - start  # a sender that sent them anyway
        if skip >= k.shape[0]:
            return
        if skip > 0:
            start, k, v = start + skip, k[skip:], v[skip:]
        # Queued, not awaited: chunks keep arriving while the engine thread copies.
        llm, rid = self.engine.engine, self.request_id
        self.engine.send(lambda: llm.write_kv(rid, layer, start, k, v))

    async def _commit(self, first: FirstToken) -> None:
        assert self.state is ImportState.RECEIVING, self.state
        lp = first.token if self._want_logprobs else None
        try:
            await self.engine.call(self.engine.engine.commit_import, self.request_id,
                                   first.token.token_id, lp)
        except ValueError as e:  # the peer's first token is outside the vocabulary
            raise KVStreamError("INVALID_ARGUMENT", f"prefill peer sent a bad first token: {e}") \
                from None
        self.state = ImportState.COMMITTED

    def _retry(self) -> None:
        assert self.state is ImportState.RECEIVING, self.state
        self.state, self._validator = ImportState.RESERVED, None  # the next peer sends it all

    async def _fall_back(self) -> None:
        assert self.state is ImportState.RECEIVING, self.state
        await self.engine.call(self.engine.engine.prefill_locally, self.request_id)
        self.state = ImportState.FELL_BACK

    def _abort(self) -> None:
        self.state = ImportState.ABORTED
        self.engine.abort(self.request_id)
