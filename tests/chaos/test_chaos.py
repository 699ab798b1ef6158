"""The chaos suite: hostile prefill peers, and a load under kill -9, SIGSTOP, restarts,
hostile peers and misbehaving clients. Afterwards every request completed with the
fault-free tokens or ended with a clear status within its deadline, every live
worker has every block free, and the router never restarted
(bench/chaos/invariants.py)."""

from __future__ import annotations

import pytest

from bench.chaos.cluster import ChaosCluster
from bench.chaos.hostile_modes import MODES
from bench.chaos.invariants import Reference
from bench.chaos.load import Prompt
from bench.chaos.scenario import hostile_sweep, run_chaos
from tests.chaos.conftest import PLAN


@pytest.mark.chaos
def test_every_hostile_peer_mode_fails_one_request_clearly_and_poisons_nothing(
        chaos_cluster: ChaosCluster, prompts: list[Prompt], fault_free: Reference) -> None:
    report = hostile_sweep(chaos_cluster, chaos_cluster.procs["router-hostile"].address,
                           prompts, fault_free, PLAN.deadline_s)
    print(report.figures())
    assert report.ok, "\n" + report.describe(limit=len(MODES) + len(prompts))
    reached = set(chaos_cluster.hostile_hits().values())
    assert reached >= set(MODES), f"modes that never reached the peer: {set(MODES) - reached}"


@pytest.mark.chaos
def test_chaos_run_every_request_correct_or_clear_and_nothing_leaks(
        chaos_cluster: ChaosCluster, prompts: list[Prompt], fault_free: Reference) -> None:
    report, took = run_chaos(chaos_cluster, prompts, PLAN, fault_free)
    figures = report.figures()
    print(f"chaos run ({took:.0f} s of load): {figures}")
    assert figures["requests"] == PLAN.requests
    assert figures["faulted"] >= 0.10 * PLAN.requests, figures
    assert figures["process_faults_applied"] >= PLAN.process_faults // 2, figures
    assert report.ok, "\n" + report.describe()
