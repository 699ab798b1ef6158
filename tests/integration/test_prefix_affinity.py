"""`pdserve up` with two decode workers and the default cost-model router, real
processes and the real default model: the second turn of a conversation goes to the
decode worker that holds its first turn's KV, seen in each worker's own prefix-cache
counters, and no block stays held."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pdserve.client import AsyncClient
from pdserve.cluster_config import ClusterConfig
from pdserve.config import RouterConfig
from tests.integration.front_door import running, split_cluster
from tests.integration.ray_helpers import metric

N_NEW = 8
Chat = list[dict[str, str]]


def _conversation(topic: str) -> Chat:
    facts = " ".join(f"Fact {i}: {topic} number {i} is worth remembering." for i in range(40))
    return [{"role": "system", "content": f"You answer questions about {topic}. {facts}"},
            {"role": "user", "content": f"Tell me one thing about {topic}."}]


@pytest.fixture(scope="module")
def two_decode(default_model_dir: Path) -> Iterator[ClusterConfig]:
    config = split_cluster(default_model_dir, decode=2)
    assert config.policy == "cost_model" and config.enable_prefix_caching  # the defaults under test
    with running(config) as c:
        yield c


def _counters(c: ClusterConfig, name: str) -> list[float]:
    return [metric(m.metrics_port, name) for m in c.decode]


async def _say(client: AsyncClient, chat: Chat) -> str:
    text = ""
    async for d in client.generate(messages=chat, max_tokens=N_NEW, ignore_eos=True,
                                   temperature=0.0):
        text += d.text
    return text


@pytest.mark.integration
def test_the_second_turn_goes_to_the_worker_holding_the_first(two_decode: ClusterConfig) -> None:
    c = two_decode
    chats = {topic: _conversation(topic) for topic in ("apples", "rivers", "violins")}
    served: dict[str, int] = {}

    async def scenario() -> None:
        client = AsyncClient(f"127.0.0.1:{c.router_port}", timeout=300)
        try:
            for topic, chat in chats.items():  # turn 1, one conversation at a time
                before = _counters(c, "pdserve:prompt_tokens_total")
                chat.append({"role": "assistant", "content": await _say(client, chat)})
                after = _counters(c, "pdserve:prompt_tokens_total")
                served[topic] = next(i for i in range(2) if after[i] > before[i])
            # The router's view of the workers' caches is up to a poll interval old.
            await asyncio.sleep(3 * RouterConfig.state_interval_s)
            for topic, chat in chats.items():  # turn 2 of each
                chat.append({"role": "user", "content": "And one more thing, briefly?"})
                hits = _counters(c, "pdserve:prefix_cache_hits_total")
                await _say(client, chat)
                gained = [a - b for a, b in zip(_counters(
                    c, "pdserve:prefix_cache_hits_total"), hits, strict=True)]
                holder = served[topic]
                assert gained[holder] >= 400, (topic, served, gained)  # the history's blocks
                assert gained[1 - holder] == 0, (topic, served, gained)
        finally:
            await client.close()

    asyncio.run(scenario())
    t0 = time.monotonic()
    ports = [m.metrics_port for m in [*c.prefill, *c.decode]]
    while not all(metric(p, "pdserve:kv_cache_usage_perc") == 0 and
                  metric(p, "pdserve:num_requests_running") == 0 for p in ports):
        assert time.monotonic() - t0 < 5.0, "blocks still held after every turn ended"
        time.sleep(0.05)
