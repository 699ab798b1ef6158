"""Which workers the router may dial: a static list, or updates read from stdin.

Static (``--decode``/``--prefill``): the list never changes. Stdin
(``--members-stdin``, used by the Ray launcher, whose router actor owns this
process): each line is a JSON object ``{"decode": [addr…], "prefill": [addr…]}``
that replaces the membership; the router only ever dials addresses it got this way.

WAITING (no line yet: every request gets RESOURCE_EXHAUSTED) → FOLLOWING (each
line applied) → CLOSED (EOF: the owner is gone; the last membership stays).
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections.abc import Awaitable, Callable

from router.policy import RoutingPolicy

log = logging.getLogger("pdserve.router.membership")


def parse_members(line: str) -> tuple[list[str], list[str]]:
    """One update line → (decode addresses, prefill addresses); ValueError names the problem."""
    data = json.loads(line)
    if not isinstance(data, dict) or set(data) - {"decode", "prefill"}:
        raise ValueError(f"membership line must be an object with decode and prefill lists, "
                         f"got {line.strip()!r}")
    decode, prefill = data.get("decode", []), data.get("prefill", [])
    for name, addrs in (("decode", decode), ("prefill", prefill)):
        if not isinstance(addrs, list) or not all(isinstance(a, str) and ":" in a for a in addrs):
            raise ValueError(f"membership {name} must be a list of host:port, got {addrs!r}")
    return decode, prefill


async def follow(policy: RoutingPolicy, readline: Callable[[], str],
                 on_decode: Callable[[list[str]], Awaitable[None]] | None = None,
                 on_prefill: Callable[[list[str]], Awaitable[None]] | None = None) -> None:
    """Apply every update line until EOF; ``on_decode`` and ``on_prefill`` hear each
    new decode and prefill list (the health probes follow them).
    ``readline`` blocks, so a daemon thread calls it: a thread from asyncio's pool
    would keep the process alive at exit."""
    loop = asyncio.get_running_loop()
    lines: asyncio.Queue[str] = asyncio.Queue()

    def pump() -> None:
        while True:
            line = readline()
            try:
                loop.call_soon_threadsafe(lines.put_nowait, line)
            except RuntimeError:  # the loop is closed: the router is exiting
                return
            if not line:
                return

    threading.Thread(target=pump, name="membership-stdin", daemon=True).start()
    while line := await lines.get():
        try:
            decode, prefill = parse_members(line)
        except ValueError as e:
            log.error("ignoring membership update: %s", e)
            continue
        policy.set_members(decode, prefill)
        if on_decode is not None:
            await on_decode(decode)
        if on_prefill is not None:
            await on_prefill(prefill)
        log.info("membership decode=%s prefill=%s", decode, prefill,
                 extra={"decode": decode, "prefill": prefill})
    log.info("membership closed (EOF); keeping the last membership")
