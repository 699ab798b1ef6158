"""``LinkRate``: the KV bytes per second a decode worker's link carries, measured from
its transfers, for the router's cost model (``WorkerState.kv_link_bytes_per_s``).

Transfers that overlap share the link, so one transfer's own bytes / seconds sees only
its share of it. The rate is therefore the bytes of the last ``WINDOW`` transfers over
the time at least one of them was under way (the union of their intervals). Transfers
under ``MIN_BYTES`` say more about latency than about the link and are left out. A
transfer that waited on its sender's compute measures less than the link could carry:
the rate is what the link has been seen to deliver.
"""

from __future__ import annotations

from collections import deque

WINDOW = 8
MIN_BYTES = 2**20


class LinkRate:
    def __init__(self) -> None:
        self._transfers: deque[tuple[float, float, int]] = deque(maxlen=WINDOW)

    def record(self, start: float, end: float, nbytes: int) -> None:
        """A transfer that carried ``nbytes`` from ``start`` to ``end`` (seconds)."""
        if nbytes >= MIN_BYTES and end > start:
            self._transfers.append((start, end, nbytes))

    @property
    def bytes_per_s(self) -> float:
        """0 until a transfer was recorded."""
        if not self._transfers:
            return 0.0
        busy, reach = 0.0, float("-inf")
        for start, end in sorted((s, e) for s, e, _ in self._transfers):
            if end > reach:  # the part of [start, end) not yet counted
                busy += end - max(start, reach)
                reach = end
        return sum(n for _, _, n in self._transfers) / busy
