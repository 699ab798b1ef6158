"""The fault schedule: what happens to which process when, while the load runs.

A ``Fault`` is one process fault: ``kill9`` (SIGKILL, then the harness starts it
again on the same port after ``duration_s``) or ``sigstop`` (SIGSTOP, SIGCONT after
``duration_s``). ``FaultRunner`` applies a schedule against a ``ChaosCluster``:
PENDING → ACTIVE (applied at ``at_s`` after the run's start; the window opens) →
OVER (restarted or resumed; the window closes). Hostile peers and misbehaving
clients are faults too, but they ride on the requests (tests/chaos/load.py).
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass

from tests.chaos.cluster import ChaosCluster

KINDS = ("kill9", "sigstop")


@dataclass
class Fault:
    at_s: float
    kind: str  # kill9 | sigstop
    target: str  # a process name of the cluster, never the router
    duration_s: float
    t_start: float = 0.0  # wall clock, once applied
    t_end: float = 0.0

    def overlaps(self, t0: float, t1: float) -> bool:
        return self.t_start > 0 and t0 <= (self.t_end or time.time()) and t1 >= self.t_start


def schedule(n: int, span_s: float, targets: Sequence[str], seed: int,
             min_gap_s: float = 1.5) -> list[Fault]:
    """``n`` faults spread over ``span_s``, one at a time, over ``targets`` in turn
    (never two down at once, so a decode worker is always up): the kills -9 first, so
    that what they killed has started again by the time the load ends, then SIGSTOPs."""
    rng = random.Random(seed)
    gap = max(min_gap_s, span_s / max(n, 1))
    out = []
    for i in range(n):
        kind = KINDS[0] if i < (n + 1) // 2 else KINDS[1]
        duration = rng.uniform(0.5, min(3.0, gap * 0.6))
        out.append(Fault(0.5 + i * gap, kind, targets[i % len(targets)], duration))
    return out


class FaultRunner:
    def __init__(self, cluster: ChaosCluster, faults: list[Fault]) -> None:
        self.cluster, self.faults = cluster, faults

    async def run(self) -> None:
        t0 = time.monotonic()
        for f in self.faults:
            await asyncio.sleep(max(0.0, t0 + f.at_s - time.monotonic()))
            await self._apply(f)

    async def _apply(self, f: Fault) -> None:
        c = self.cluster
        if not c.procs[f.target].alive:  # still starting again after an earlier kill
            return
        f.t_start = time.time()
        if f.kind == "kill9":
            c.kill9(f.target)
            await asyncio.sleep(f.duration_s)
            c.restart(f.target)
        else:
            c.sigstop(f.target)
            await asyncio.sleep(f.duration_s)
            c.sigcont(f.target)
        f.t_end = time.time()

    def applied(self) -> list[Fault]:
        return [f for f in self.faults if f.t_start > 0]
