"""The fault schedule: what happens to which process when, while the load runs.

A ``Fault`` is one process fault: ``kill9`` (SIGKILL, then the harness starts it
again on the same port after ``duration_s``) or ``sigstop`` (SIGSTOP, SIGCONT after
``duration_s``). ``FaultRunner`` applies a schedule against a ``ChaosCluster``, each
fault PENDING → WAITING (not before ``at_s``; while its target, or for a decode
worker any other decode worker, is still impaired: one decode worker always serves)
→ ACTIVE (applied; the window opens) → OVER (serving again and seen so by the
router's health probes: the window closes).
Faults still pending when the load ends are skipped. Hostile peers and misbehaving
clients are faults too, but they ride on the requests (bench/chaos/load.py).
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass

from bench.chaos.cluster import ChaosCluster

KINDS = ("kill9", "sigstop")
# The router sees a worker back only at its next health probe (1 s apart): the
# window stays open that long after the worker serves again, so two faults never
# leave the router without a decode worker it knows is up.
ROUTER_SEES_IT_S = 2.5


@dataclass
class Fault:
    at_s: float
    kind: str  # kill9 | sigstop
    target: str  # a process name of the cluster, never the router
    duration_s: float
    t_start: float = 0.0  # wall clock, once applied
    t_end: float = 0.0  # wall clock, once its target serves again

    def overlaps(self, t0: float, t1: float) -> bool:
        return self.t_start > 0 and t0 <= (self.t_end or time.time()) and t1 >= self.t_start


def schedule(n: int, span_s: float, targets: Sequence[str], seed: int) -> list[Fault]:
    """``n`` faults spread over ``span_s``, over ``targets`` in turn, kill -9 and
    SIGSTOP in turn (each target gets both), each lasting 0.5-3 s (a kill's restart
    then takes what the worker's start takes)."""
    rng = random.Random(seed)
    gap = span_s / max(n, 1)
    return [Fault(0.5 + i * gap, KINDS[(i + i // len(targets)) % 2], targets[i % len(targets)],
                  rng.uniform(0.5, 3.0)) for i in range(n)]


class FaultRunner:
    def __init__(self, cluster: ChaosCluster, faults: list[Fault]) -> None:
        self.cluster, self.faults = cluster, faults
        self.impaired: set[str] = set()
        self.load_over = asyncio.Event()

    async def run(self) -> None:
        """Until every fault is over or skipped (``load_over`` set before it began)."""
        t0 = time.monotonic()
        await asyncio.gather(*(self._one(f, t0) for f in self.faults))

    async def _one(self, f: Fault, t0: float) -> None:
        await asyncio.sleep(max(0.0, t0 + f.at_s - time.monotonic()))
        while self._blocked(f):
            if self.load_over.is_set():
                return
            await asyncio.sleep(0.1)
        if self.load_over.is_set():
            return
        self.impaired.add(f.target)
        try:
            await self._apply(f)
        finally:
            self.impaired.discard(f.target)

    def _blocked(self, f: Fault) -> bool:
        role = self.cluster.procs[f.target].role
        return f.target in self.impaired or role == "decode" and any(
            self.cluster.procs[n].role == "decode" for n in self.impaired)

    async def _apply(self, f: Fault) -> None:
        c = self.cluster
        f.t_start = time.time()
        if f.kind == "kill9":
            c.kill9(f.target)
            await asyncio.sleep(f.duration_s)
            c.restart(f.target)
            await asyncio.to_thread(c.wait_serving, f.target, 600)
        else:
            c.sigstop(f.target)
            await asyncio.sleep(f.duration_s)
            c.sigcont(f.target)
        await asyncio.sleep(ROUTER_SEES_IT_S)
        f.t_end = time.time()

    def applied(self) -> list[Fault]:
        return [f for f in self.faults if f.t_start > 0]
