"""A chaos run from start to verdict, shared by tests/chaos and ``pdserve bench --chaos``.

REFERENCE (every prompt of the pool once per transport, no fault: the outputs every
later answer must equal) → CHAOS (the load, a share of it hostile-tagged or
misbehaving, while the fault schedule kills and stops workers and peers) → SETTLE
(whatever the harness killed is serving again) → CHECKED (bench/chaos/invariants.py).

``hostile_sweep`` is the deterministic half: every hostile mode once through a router
whose only prefill worker is a hostile peer (one after the other, the stalling ones
alongside so their waits overlap), then every prompt again (a poisoned or dead
engine shows up there).
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass

from bench.chaos.cluster import ChaosCluster
from bench.chaos.faults import Fault, FaultRunner, schedule
from bench.chaos.hostile_modes import MODES
from bench.chaos.invariants import Reference, Report, check, reference_key
from bench.chaos.load import CLIENT_FAULTS, LoadGenerator, Outcome, Prompt, RequestSpec

TRANSPORTS = ("grpc", "grpc", "http", "http_stream")


@dataclass(frozen=True)
class ChaosPlan:
    requests: int = 100
    prompts: int = 24
    hostile_share: float = 0.12
    client_fault_share: float = 0.08
    process_faults: int = 8
    rate: float = 5.0  # requests per second
    concurrency: int = 8
    deadline_s: float = 20.0
    settle_s: float = 5.0
    seed: int = 0


def plan_requests(plan: ChaosPlan, prompts: list[Prompt], threshold: int) -> list[RequestSpec]:
    """The chaos load: transports in turn; hostile modes (on prompts long enough to be
    prefilled remotely) and client faults on a seeded share."""
    rng = random.Random(plan.seed)
    modes = [m for m in MODES if m != "passthrough"]
    remote = [i for i, p in enumerate(prompts) if len(p.token_ids) >= threshold]
    specs = []
    for i in range(plan.requests):
        rid, transport = f"chaos-{i:05d}", TRANSPORTS[i % len(TRANSPORTS)]
        prompt, mode, client = rng.randrange(len(prompts)), None, None
        roll = rng.random()
        if roll < plan.hostile_share:
            mode, prompt = modes[i % len(modes)], rng.choice(remote)
            rid += f"~h={mode}"
        elif roll < plan.hostile_share + plan.client_fault_share:
            client = CLIENT_FAULTS[i % len(CLIENT_FAULTS)]
        specs.append(RequestSpec(rid, prompt, transport, client, mode))
    return specs


async def reference(load: LoadGenerator, n_prompts: int, tag: str = "ref") -> Reference:
    """Every prompt once over gRPC and once over HTTP, no fault."""
    specs = [RequestSpec(f"{tag}-{i}-{t}", i, t) for i in range(n_prompts)
             for t in ("grpc", "http")]
    outcomes = await load.run(specs, rate=0, concurrency=8)
    bad = [o for o in outcomes if o.status != "completed"]
    if bad:
        first = [(o.spec.rid, o.code, o.message) for o in bad[:5]]
        raise RuntimeError(f"the fault-free run failed: {first}")
    return {reference_key(o): (o.token_ids, o.text) for o in outcomes}


async def chaos_load(cluster: ChaosCluster, load: LoadGenerator, specs: list[RequestSpec],
                     plan: ChaosPlan, faults: list[Fault]) -> list[Outcome]:
    runner = FaultRunner(cluster, faults)
    schedule_task = asyncio.create_task(runner.run())
    try:
        return await load.run(specs, plan.rate, plan.concurrency)
    finally:
        runner.load_over.set()
        await schedule_task  # every fault over: killed processes serve again, stopped resumed


def fault_targets(cluster: ChaosCluster) -> list[str]:
    """Decode workers in turn with the prefill side (hostile peers, then the real one)."""
    decode = [p.name for p in cluster.of_role("decode")]
    other = [p.name for p in cluster.of_role("hostile") + cluster.of_role("prefill")]
    out = []
    for i in range(max(len(decode), len(other))):
        out += decode[i:i + 1] + other[i:i + 1]
    return out


def settle(cluster: ChaosCluster, timeout: float = 300) -> None:
    """Everything the harness restarted answers SERVING again."""
    for p in cluster.procs.values():
        if p.alive and p.starts > 1:
            cluster.wait_serving(p.name, timeout)


def run_chaos(cluster: ChaosCluster, prompts: list[Prompt], plan: ChaosPlan,
              ref: Reference | None = None) -> tuple[Report, float]:
    """One chaos run on a started cluster; (report, seconds the load took)."""
    load = LoadGenerator(cluster.router_address, cluster.http_url, prompts, plan.deadline_s)
    if ref is None:
        ref = asyncio.run(reference(load, len(prompts)))
    router_pid = cluster.procs["router"].pid
    specs = plan_requests(plan, prompts, cluster.spec.local_prefill_below)
    targets = fault_targets(cluster)
    span = plan.requests / plan.rate if plan.rate else 10.0
    faults = schedule(plan.process_faults, span, targets, plan.seed)
    t0 = time.monotonic()
    outcomes = asyncio.run(chaos_load(cluster, load, specs, plan, faults))
    took = time.monotonic() - t0
    settle(cluster)
    return check(cluster, outcomes, ref, faults, router_pid, plan.settle_s), took


def hostile_sweep(cluster: ChaosCluster, router: str, prompts: list[Prompt], ref: Reference,
                  deadline_s: float) -> Report:
    """Every hostile mode once through ``router`` (whose only prefill worker is hostile
    peer 0), in order, stalling modes concurrently with the rest; then every prompt
    again over gRPC, unfaulted."""
    load = LoadGenerator(router, cluster.http_url, prompts, deadline_s)
    remote = [i for i, p in enumerate(prompts)
              if len(p.token_ids) >= cluster.spec.local_prefill_below]
    specs = [RequestSpec(f"sweep-{n}~h={mode}", remote[n % len(remote)], "grpc", None, mode)
             for n, mode in enumerate(MODES)]
    after = [RequestSpec(f"after-{i}", i, "grpc") for i in range(len(prompts))]
    router_pid = cluster.procs["router"].pid

    stalls = [s for s in specs if "stall" in (s.hostile_mode or "")]
    rest = [s for s in specs if s not in stalls]

    async def all_of_them() -> list[Outcome]:
        stalled, hostile = await asyncio.gather(
            load.run(stalls, rate=0, concurrency=len(stalls)),
            load.run(rest, rate=0, concurrency=1))
        return stalled + hostile + await load.run(after, rate=0, concurrency=8)

    outcomes = asyncio.run(all_of_them())
    return check(cluster, outcomes, ref, [], router_pid, 5.0)
