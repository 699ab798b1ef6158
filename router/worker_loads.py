"""The router's view of its workers' live state: ``WorkerState.GetState`` polled from
every decode and prefill worker (``DecodeBackend.get_state``).

Per worker: NONE (never answered) → FRESH (answered within ``max_age_s``) → STALE
(no answer since: a worker that stops answering is ignored, and the policy falls back
to its own in-flight counts for it) → FRESH again on its next answer. A worker
leaving the membership is forgotten. One task polls all workers each
``interval_s``, concurrently, each with ``timeout_s``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence

from pdserve.worker_state import WorkerLoad
from router.decode_backend import DecodeBackend

log = logging.getLogger(__name__)


class WorkerLoads:
    def __init__(self, backend: DecodeBackend, decode: Sequence[str], prefill: Sequence[str],
                 interval_s: float = 0.25, max_age_s: float = 2.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.backend = backend
        self.clock = clock
        self.interval_s, self.max_age_s = interval_s, max_age_s
        self.timeout_s = max(interval_s * 4, 0.5)
        self._addresses = {"decode": list(decode), "prefill": list(prefill)}
        self._last: dict[str, tuple[float, WorkerLoad]] = {}
        self._task: asyncio.Task[None] | None = None

    def get(self, address: str) -> WorkerLoad | None:
        """The worker's last state if it is FRESH, else None."""
        entry = self._last.get(address)
        if entry is None or self.clock() - entry[0] > self.max_age_s:
            return None
        return entry[1]

    async def set_decode(self, addresses: list[str]) -> None:
        self._set("decode", addresses)

    async def set_prefill(self, addresses: list[str]) -> None:
        self._set("prefill", addresses)

    def _set(self, role: str, addresses: list[str]) -> None:
        self._addresses[role] = list(addresses)
        known = {a for addrs in self._addresses.values() for a in addrs}
        for gone in set(self._last) - known:
            del self._last[gone]

    async def poll_all(self) -> None:
        addresses = [a for addrs in self._addresses.values() for a in addrs]
        loads = await asyncio.gather(*(self._poll(a) for a in addresses))
        now = self.clock()
        for address, load in zip(addresses, loads, strict=True):
            if load is not None:
                self._last[address] = (now, load)

    async def _poll(self, address: str) -> WorkerLoad | None:
        try:
            return await self.backend.get_state(address, self.timeout_s)
        except Exception as e:  # noqa: BLE001 - a worker's bad answer is its own problem
            log.debug("state poll of %s failed: %s", address, e)
            return None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while True:
            await self.poll_all()
            await asyncio.sleep(self.interval_s)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
