"""In-process ``KVSource`` fakes: no network, same events as the real one.

- ``LoopbackKVSource``: prefills on an ``AsyncEngine`` (the decode worker's own, or a
  separate "prefill" engine in tests) and encodes what its exporter yields, exactly
  as a prefill worker would put it on the wire.
- ``ScriptedKVSource``: replays a list of events, optionally editing them first or
  failing after some (a dead peer, a stalled one), for the hostile-stream tests.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncGenerator, Callable

from pdserve.engine.async_engine import AsyncEngine, KVPiece
from pdserve.engine.kv_export import export_kv
from pdserve.kvwire.codec import Encoding, encode
from pdserve.kvwire.stream import KVChunk, KVEvent, KVHeader, KVRequest, KVStreamError


class LoopbackKVSource:
    def __init__(self, engine: AsyncEngine, suffix: str = "/loopback") -> None:
        self.engine = engine
        self.suffix = suffix  # its own request id: the importing one is in use

    async def prefill(self, address: str, request: KVRequest,
                      timeout: float) -> AsyncGenerator[KVEvent, None]:
        rid = request.request_id + self.suffix
        seq, enc = 0, request.encoding
        async for event in export_kv(self.engine, dataclasses.replace(request, request_id=rid)):
            if isinstance(event, KVPiece):
                yield _chunk(seq, event, enc)
                seq += 1
                continue
            if isinstance(event, KVHeader):
                enc = event.encoding  # MODEL resolved
            yield event

    async def is_alive(self, address: str, timeout: float) -> bool:
        return True

    async def record(self, request: KVRequest) -> list[KVEvent]:
        """Every event of one stream, for scripting."""
        return [e async for e in self.prefill("loopback", request, 60.0)]

    async def close(self) -> None:
        pass


def _chunk(seq: int, piece: KVPiece, enc: Encoding) -> KVChunk:
    payload = encode(piece.k, piece.v, enc)
    return KVChunk(seq, piece.layer, piece.start, piece.k.shape[0], enc, payload,
                   payload.crc32c())


class ScriptedKVSource:
    """Replays ``events``; after ``fail_after`` of them raises ``fail`` (None: never), or
    waits on ``stall`` (an Event never set: a peer that hangs). ``alive`` is its health
    answer (a stalled peer that still answers is busy, not dead)."""

    def __init__(self, events: list[KVEvent], fail: KVStreamError | None = None,
                 fail_after: int | None = None, stall: asyncio.Event | None = None,
                 edit: Callable[[list[KVEvent]], list[KVEvent]] | None = None,
                 alive: bool = False) -> None:
        self.alive = alive
        self.probes = 0
        self.events = edit(list(events)) if edit is not None else list(events)
        self.fail, self.fail_after, self.stall = fail, fail_after, stall
        self.sent = 0
        self.stalled = asyncio.Event()  # set when it starts to hang on ``stall``
        self.closed = False

    async def prefill(self, address: str, request: KVRequest,
                      timeout: float) -> AsyncGenerator[KVEvent, None]:
        try:
            for event in self.events:
                if self.sent == self.fail_after:
                    await self._break()
                self.sent += 1
                yield event
            if self.fail_after is not None and self.sent <= self.fail_after:
                await self._break()
        finally:
            self.closed = True

    async def is_alive(self, address: str, timeout: float) -> bool:
        self.probes += 1
        return self.alive

    async def _break(self) -> None:
        if self.stall is not None:
            self.stalled.set()
            await self.stall.wait()
        if self.fail is not None:
            raise self.fail

    async def close(self) -> None:
        pass
