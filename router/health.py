"""Which decode workers the router may use, from periodic ``grpc.health.v1`` probes.

Per decode worker: UNKNOWN (not probed yet) → UP (answered SERVING) ⇄ DOWN
(answered NOT_SERVING, refused the connection, or missed ``misses_to_down``
probes in a row: a slow answer on a busy machine is not yet a death). The router
is usable while at least one worker is UP; ``on_change`` tells the servers when
that flips, so their health answers follow.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from router.decode_client import DecodeClients

log = logging.getLogger(__name__)


class DecodeHealth:
    def __init__(self, addresses: list[str], clients: DecodeClients,
                 on_change: Callable[[bool], Awaitable[None]], interval_s: float = 1.0,
                 probe_timeout_s: float = 2.0, misses_to_down: int = 3) -> None:
        self.addresses = addresses
        self.clients = clients
        self.on_change = on_change
        self.interval_s, self.probe_timeout_s = interval_s, probe_timeout_s
        self.misses_to_down = misses_to_down
        self.up: set[str] = set()
        self._misses = dict.fromkeys(addresses, 0)
        self._usable: bool | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def usable(self) -> bool:
        return bool(self.up)

    def down(self) -> set[str]:
        return set(self.addresses) - self.up

    async def set_addresses(self, addresses: list[str]) -> None:
        """Membership changed (router/membership.py): probe the new list now."""
        self.addresses = list(addresses)
        self.up &= set(addresses)
        self._misses = {a: self._misses.get(a, 0) for a in addresses}
        await self.probe_all()

    async def probe_all(self) -> None:
        answers = await asyncio.gather(
            *(self.clients.is_serving(a, self.probe_timeout_s) for a in self.addresses))
        for address, serving in zip(self.addresses, answers, strict=True):
            if serving:
                self._mark_up(address)
            elif serving is False:
                self._mark_down(address)
            else:
                self._missed(address)
        if self.usable != self._usable:
            self._usable = self.usable
            log.info("decode workers up: %s; router %s", sorted(self.up),
                     "SERVING" if self.usable else "NOT_SERVING")
            await self.on_change(self.usable)

    def _mark_up(self, address: str) -> None:
        self._misses[address] = 0
        self.up.add(address)

    def _mark_down(self, address: str) -> None:
        if address in self.up:
            log.warning("decode worker %s is down", address)
        self.up.discard(address)

    def _missed(self, address: str) -> None:
        self._misses[address] += 1
        if self._misses[address] >= self.misses_to_down or address not in self.up:
            self._mark_down(address)

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop())

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await self.probe_all()
            except Exception:  # a probe bug must not stop the probing
                log.exception("decode health probe failed")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
