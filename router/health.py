"""Which workers of one role the router may use, from periodic health probes
(``DecodeBackend.is_serving``: ``grpc.health.v1`` on the real backend). The
router keeps one for its decode workers and one (``role="prefill"``) for its
prefill workers, whose REMOTE plans go only to prefill workers UP.

Per worker (``WorkerState``)::

    UNKNOWN ─SERVING──────────────────────────────────────────▶ UP
    UNKNOWN ─NOT_SERVING, refused, or no answer in time───────▶ DOWN
    UP      ─NOT_SERVING or refused───────────────────────────▶ DOWN
    UP      ─no answer to ``misses_to_down`` probes in a row──▶ DOWN
    DOWN    ─SERVING──────────────────────────────────────────▶ UP

A miss (no answer in time) takes an UP worker down only after ``misses_to_down``
in a row: a slow answer on a busy machine is not yet a death. Only UP workers are
routed to. The router is usable while at least one worker is UP; ``on_change``
tells the servers when that flips, so their health answers follow.
"""

from __future__ import annotations

import asyncio
import enum
import logging
from collections.abc import Awaitable, Callable, Sequence

from router.decode_backend import DecodeBackend

log = logging.getLogger(__name__)


class WorkerState(enum.Enum):
    UNKNOWN = "unknown"
    UP = "up"
    DOWN = "down"


class DecodeHealth:
    def __init__(self, addresses: Sequence[str], backend: DecodeBackend,
                 on_change: Callable[[bool], Awaitable[None]], interval_s: float = 1.0,
                 probe_timeout_s: float = 2.0, misses_to_down: int = 3,
                 role: str = "decode") -> None:
        self.role = role  # only for what it logs: the probes are the same for every role
        self.backend = backend
        self.on_change = on_change
        self.interval_s, self.probe_timeout_s = interval_s, probe_timeout_s
        self.misses_to_down = misses_to_down
        self._states = dict.fromkeys(addresses, WorkerState.UNKNOWN)
        self._misses = dict.fromkeys(addresses, 0)
        self._usable: bool | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def addresses(self) -> list[str]:
        return list(self._states)

    @property
    def up(self) -> set[str]:
        return {a for a, s in self._states.items() if s is WorkerState.UP}

    @property
    def usable(self) -> bool:
        return bool(self.up)

    def state(self, address: str) -> WorkerState:
        return self._states[address]

    def down(self) -> set[str]:
        """Workers not to route to: DOWN, or UNKNOWN (not answered yet)."""
        return set(self._states) - self.up

    async def set_addresses(self, addresses: Sequence[str]) -> None:
        """Membership changed (router/membership.py): probe the new list now."""
        self._states = {a: self._states.get(a, WorkerState.UNKNOWN) for a in addresses}
        self._misses = {a: self._misses.get(a, 0) for a in addresses}
        await self.probe_all()

    async def probe_all(self) -> None:
        addresses = self.addresses
        answers = await asyncio.gather(
            *(self.backend.is_serving(a, self.probe_timeout_s) for a in addresses))
        for address, serving in zip(addresses, answers, strict=True):
            if address not in self._states:
                continue  # removed by a membership change while the probe was out
            if serving:
                self._mark_up(address)
            elif serving is False:
                self._mark_down(address)
            else:
                self._missed(address)
        await self._tell_if_usability_flipped()

    async def _tell_if_usability_flipped(self) -> None:
        if self.usable != self._usable:
            self._usable = self.usable
            log.info("%s workers up: %s; usable: %s", self.role, sorted(self.up), self.usable)
            await self.on_change(self.usable)

    def _mark_up(self, address: str) -> None:
        self._misses[address] = 0
        self._states[address] = WorkerState.UP

    def _mark_down(self, address: str) -> None:
        if self._states[address] is WorkerState.UP:
            log.warning("%s worker %s is down", self.role, address)
        self._states[address] = WorkerState.DOWN

    def _missed(self, address: str) -> None:
        self._misses[address] += 1
        if self._misses[address] >= self.misses_to_down or \
                self._states[address] is not WorkerState.UP:
            self._mark_down(address)

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop())

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await self.probe_all()
            except Exception:  # a probe bug must not stop the probing
                log.exception("%s health probe failed", self.role)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
