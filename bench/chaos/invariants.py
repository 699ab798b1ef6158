"""What must hold after a chaos run, and the figures that say whether it did.

Per request (``judge``), against the fault-free outputs of the same prompts over the
same transport:

- ``identical``: completed with exactly the reference tokens (gRPC) or text (HTTP).
- ``failed_clear``: ended with a clear status (a gRPC code other than UNKNOWN or
  INTERNAL with details; an OpenAI error envelope with a message, as the response
  or as an event of the stream) before its deadline.
- ``disconnected``: the client walked away; what it got is a prefix of the reference.
- Violations: ``mismatch`` (completed with other tokens), ``unclear`` (an error that
  says nothing, or a stream cut without one), ``hung`` (no end within the deadline),
  ``bad_prefix``.

And the issue's stronger demands: a request hit only by faults the cluster must
absorb (a worker killed or stopped, a prefill peer that stalls, is down or full,
slow clients) completes identically (else ``not_recovered``); a request hit by
hostile data that fails names the prefill side, the word or the peer's address (else
``unnamed``). After the load: every live worker has every block free within
``settle_s``, no process died that the harness did not kill, and the router has the
pid it started with.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from bench.chaos.cluster import ChaosCluster
from bench.chaos.faults import Fault
from bench.chaos.hostile_modes import MODES, Expect
from bench.chaos.load import Outcome

VIOLATIONS = ("mismatch", "unclear", "hung", "bad_prefix", "not_recovered", "unnamed")


@dataclass
class Verdict:
    outcome: Outcome
    kind: str  # identical | failed_clear | disconnected | a violation
    faults: list[str] = field(default_factory=list)  # what hit this request


@dataclass
class Report:
    verdicts: list[Verdict]
    leaks: dict[str, dict[str, float]]
    router_restarted: bool
    faults_applied: int
    crashed: list[str]  # processes that died without the harness killing them

    @property
    def violations(self) -> list[Verdict]:
        return [v for v in self.verdicts if v.kind in VIOLATIONS]

    @property
    def ok(self) -> bool:
        return not (self.violations or self.leaks or self.router_restarted or self.crashed)

    def figures(self) -> dict[str, Any]:
        kinds = Counter(v.kind for v in self.verdicts)
        return {
            "requests": len(self.verdicts),
            "faulted": sum(1 for v in self.verdicts if v.faults),
            "hit_by_hostile_peer": sum(1 for v in self.verdicts
                                       if any(f.startswith("hostile:") for f in v.faults)),
            "hit_by_process_fault": sum(1 for v in self.verdicts if any(
                f.startswith(("kill9:", "sigstop:")) for f in v.faults)),
            "client_faults": sum(1 for v in self.verdicts
                                 if any(f.startswith("client:") for f in v.faults)),
            "process_faults_applied": self.faults_applied,
            "completed_identical": kinds["identical"],
            "failed_with_status": kinds["failed_clear"],
            "disconnected_by_client": kinds["disconnected"],
            "hung": kinds["hung"],
            "mismatched": kinds["mismatch"],
            "unclear_errors": kinds["unclear"],
            "http_500": sum(1 for v in self.verdicts if v.outcome.code == "500"),
            "not_recovered": kinds["not_recovered"],
            "failure_not_naming_prefill": kinds["unnamed"],
            "leaked_blocks": sum(int(m.get("leaked_blocks", 0)) for m in self.leaks.values()),
            "workers_not_idle": sorted(self.leaks),
            "migrated": sum(1 for v in self.verdicts if v.kind == "identical" and
                            any(f.startswith("kill9:decode") for f in v.faults)),
            "router_restarted": self.router_restarted,
            "processes_crashed": self.crashed,
        }

    def describe(self, limit: int = 25) -> str:
        lines = [f"{v.kind}: {v.outcome.spec.rid} ({v.outcome.spec.transport}) faults="
                 f"{v.faults} status={v.outcome.status} code={v.outcome.code} "
                 f"{v.outcome.message[:160]!r}" for v in self.violations[:limit]]
        lines += [f"not idle: {name} {m}" for name, m in self.leaks.items()]
        if self.router_restarted:
            lines.append("the router process restarted or died")
        lines += [f"crashed on its own: {name}" for name in self.crashed]
        return "\n".join(lines)


Reference = dict[tuple[int, str], tuple[list[int], str]]  # (prompt, transport) → ids, text


def reference_key(o: Outcome) -> tuple[int, str]:
    return (o.spec.prompt_index, "grpc" if o.spec.transport == "grpc" else "http")


def attribute(o: Outcome, faults: list[Fault], seen: dict[str, set[str]],
              hostile: dict[str, str]) -> list[str]:
    """Every fault that hit ``o``: a process fault while it was in flight on that
    process, a hostile peer that got its prefill, its own client misbehaviour."""
    hit = [f"{f.kind}:{f.target}" for f in faults
           if o.spec.rid in seen.get(f.target, set()) and f.overlaps(o.t_start, o.t_end)]
    mode = hostile.get(o.spec.rid)
    if mode and mode != "passthrough":
        hit.append(f"hostile:{mode}")
    if o.spec.client_fault:
        hit.append(f"client:{o.spec.client_fault}")
    return hit


def judge(o: Outcome, ref: Reference, hit: list[str], peer_names: set[str]) -> Verdict:
    """``peer_names``: what names the prefill side in an error ("prefill", the
    hostile peers' addresses)."""
    ids, text = ref[reference_key(o)]
    grpc_call = o.spec.transport == "grpc"
    rejected = any(h.startswith("hostile:") and h[8:] in MODES and
                   MODES[h[8:]][0] is Expect.REJECT for h in hit)
    if o.status == "disconnected":
        ok = o.token_ids == ids[:len(o.token_ids)] if grpc_call else text.startswith(o.text)
        return Verdict(o, "disconnected" if ok else "bad_prefix", hit)
    if o.status == "completed":
        same = o.token_ids == ids if grpc_call else o.text == text
        return Verdict(o, "identical" if same else "mismatch", hit)
    if o.status == "hung":
        return Verdict(o, "hung", hit)
    if not o.clear:
        return Verdict(o, "unclear", hit)
    if not rejected:  # nothing hostile: the cluster had to absorb whatever happened
        return Verdict(o, "not_recovered", hit)
    if not any(name in o.message.lower() for name in peer_names):
        return Verdict(o, "unnamed", hit)
    return Verdict(o, "failed_clear", hit)


def idle_workers(cluster: ChaosCluster, settle_s: float) -> dict[str, dict[str, float]]:
    """Workers still holding blocks or requests ``settle_s`` after the load stopped
    (empty when every live worker is idle)."""
    deadline = time.monotonic() + settle_s
    while True:
        busy = {}
        for p in cluster.of_role("prefill") + cluster.of_role("decode"):
            if not p.alive:
                continue
            m = cluster.metrics(p.name)
            usage = m.get("pdserve:kv_cache_usage_perc", 0.0)
            held = {"kv_cache_usage_perc": usage,
                    "leaked_blocks": round(usage * cluster.kv_blocks(p.name)),
                    "num_requests_running": m.get("pdserve:num_requests_running", 0.0),
                    "num_requests_waiting": m.get("pdserve:num_requests_waiting", 0.0)}
            if usage or held["num_requests_running"] or held["num_requests_waiting"]:
                busy[p.name] = held
        if not busy or time.monotonic() > deadline:
            return busy
        time.sleep(0.25)


def check(cluster: ChaosCluster, outcomes: list[Outcome], ref: Reference,
          faults: list[Fault], router_pid: int, settle_s: float) -> Report:
    seen = {name: cluster.request_ids_seen(name) for name in cluster.procs}
    hostile = cluster.hostile_hits()
    names = {"prefill", *(p.address for p in cluster.of_role("hostile"))}
    verdicts = [judge(o, ref, attribute(o, faults, seen, hostile), names) for o in outcomes]
    router = cluster.procs["router"]
    crashed = [p.name for p in cluster.procs.values() if not p.alive]
    return Report(verdicts, idle_workers(cluster, settle_s),
                  not router.alive or router.pid != router_pid or router.starts != 1,
                  sum(1 for f in faults if f.t_start), crashed)
