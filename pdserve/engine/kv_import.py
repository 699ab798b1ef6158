"""One request's KV import on the decode side: its prompt's KV comes from a peer.

States (each import is in exactly one)::

    RESERVED ──run──▶ RECEIVING ──first token──────────────────▶ COMMITTED
                          ├──peer unavailable, fallback allowed──▶ FELL_BACK
                          └──anything else───────────────────────▶ ABORTED

- RESERVED: the engine holds blocks for the prompt (and its first token) in an
  IMPORTING request; nothing written yet.
- RECEIVING: every event is checked (``KVStreamValidator``); each chunk is decoded,
  must be finite (else DATA_LOSS) and is written into those blocks on the engine thread.
- COMMITTED: every layer complete, the first token known (and inside the
  vocabulary, else ABORTED with INVALID_ARGUMENT): the request joins the decode
  batch; its blocks are freed when it finishes.
- FELL_BACK: the peer was unreachable or died (``PeerFailed`` UNAVAILABLE) and the
  caller allowed it: the reserved blocks are freed, what arrived is dropped, the
  prompt is prefilled here (the request waits like any other); blocks freed at finish.
- ABORTED: a bad stream, another peer failure, or cancellation: the request is
  aborted in the engine, which frees its blocks; the error propagates.

An import never run is freed with its request: closing the ``RequestStream`` of an
unfinished request aborts it.

``run`` drives the machine over a stream of ``KVEvent``; each arrow is one method.
"""

from __future__ import annotations

import enum
from collections.abc import AsyncGenerator
from typing import TYPE_CHECKING

import torch

from pdserve.kvwire.receiver import TransferStats, receive_kv
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
        self.error: PeerFailed | None = None  # why it fell back
        self._validator = KVStreamValidator(expected)
        self._want_logprobs = want_logprobs

    async def run(self, events: AsyncGenerator[KVEvent, None], fall_back: bool) -> None:
        """Receive ``events`` into the reserved blocks and commit; or fall back to a
        local prefill (peer unavailable and ``fall_back``); else abort and raise."""
        try:
            try:
                self._receiving()
                first, self.stats = await receive_kv(events, self._validator, self._write)
                await self._commit(first)
            except PeerFailed as e:
                if not (fall_back and e.unavailable):
                    raise
                await self._fall_back(e)
        except BaseException:  # bad stream, cancelled call: no block may stay reserved
            self._abort()
            raise

    # --- transitions ---------------------------------------------------------------
    def _receiving(self) -> None:
        assert self.state is ImportState.RESERVED, self.state
        self.state = ImportState.RECEIVING

    def _write(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
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

    async def _fall_back(self, error: PeerFailed) -> None:
        assert self.state is ImportState.RECEIVING, self.state
        self.error = error
        await self.engine.call(self.engine.engine.prefill_locally, self.request_id)
        self.state = ImportState.FELL_BACK

    def _abort(self) -> None:
        self.state = ImportState.ABORTED
        self.engine.abort(self.request_id)
