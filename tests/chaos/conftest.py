"""The chaos cluster on the tiny random Llama: router (plus a second router whose only
prefill worker is hostile), a prefill worker, two decode workers and a hostile
prefill peer, as real processes; the prompt pool and its fault-free outputs."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.chaos.cluster import ChaosCluster, ClusterSpec
from bench.chaos.invariants import Reference
from bench.chaos.load import LoadGenerator, Prompt, prompt_pool
from bench.chaos.scenario import ChaosPlan, reference

PLAN = ChaosPlan()


@pytest.fixture(scope="module")
def chaos_cluster(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory,
                  ) -> Iterator[ChaosCluster]:
    logs = tmp_path_factory.mktemp("chaos-logs")
    cluster = ChaosCluster(ClusterSpec(model=str(tiny_llama)), logs)
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.close()
        print(f"chaos cluster logs: {logs}")


@pytest.fixture(scope="module")
def prompts(chaos_cluster: ChaosCluster) -> list[Prompt]:
    return prompt_pool(PLAN.prompts, chaos_cluster.vocab_size, PLAN.seed, max_prompt=200)


@pytest.fixture(scope="module")
def fault_free(chaos_cluster: ChaosCluster, prompts: list[Prompt]) -> Reference:
    load = LoadGenerator(chaos_cluster.router_address, chaos_cluster.http_url, prompts,
                         PLAN.deadline_s)
    return asyncio.run(reference(load, len(prompts)))
