"""The real cluster: router, prefill and decode workers as separate processes on
real sockets with the real default model."""

from __future__ import annotations

import asyncio
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from pdserve import LLM, SamplingParams
from pdserve.client import AsyncClient
from pdserve.cluster_config import ClusterConfig
from tests.integration.front_door import running, split_cluster

QUESTIONS = ["What is the capital of France?", "Name three colors.", "What is 2 + 2?",
             "Who wrote Hamlet?", "Say hello in Spanish.", "What is a KV cache?",
             "Name a planet.", "What is the boiling point of water?", "Define gravity.",
             "Write a short poem about cats."]
N_NEW = 24


def _metric(port: int, name: str) -> float:
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    total = 0.0
    for line in body.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            total += float(line.rsplit(" ", 1)[1])
    return total


@pytest.fixture(scope="module")
def cluster(default_model_dir: Path) -> Iterator[ClusterConfig]:
    with running(split_cluster(default_model_dir, policy="load_aware",
                               local_prefill_below=1)) as c:  # every prompt remote
        yield c


@pytest.mark.integration
def test_ten_concurrent_prompts_match_offline_and_kv_crossed(
        cluster: ClusterConfig, default_model_dir: Path) -> None:
    llm = LLM(model=str(default_model_dir), dtype="float32")
    convs = [[{"role": "user", "content": q}] for q in QUESTIONS]
    params = SamplingParams(temperature=0, max_tokens=N_NEW, ignore_eos=True)
    expected = [o.token_ids for o in llm.chat(convs, params)]  # type: ignore[arg-type]

    async def one(client: AsyncClient, conv: list[dict[str, str]]) -> tuple[list[int], str]:
        ids: list[int] = []
        plan = ""
        async for d in client.generate(messages=conv, max_tokens=N_NEW, ignore_eos=True):
            ids += d.token_ids
            plan = d.timings.get("plan", plan)
        return ids, plan

    async def all_of_them() -> list[tuple[list[int], str]]:
        client = AsyncClient(f"127.0.0.1:{cluster.router_port}", timeout=300)
        try:
            return await asyncio.gather(*(one(client, c) for c in convs))
        finally:
            await client.close()

    got = asyncio.run(all_of_them())
    assert [g[0] for g in got] == expected
    assert {g[1] for g in got} == {"remote"}
    sent = _metric(cluster.prefill[0].metrics_port, "pdserve:kv_transfer_bytes_total")
    received = _metric(cluster.decode[0].metrics_port, "pdserve:kv_transfer_bytes_total")
    assert sent == received > 0


def _pool_empty(c: ClusterConfig) -> bool:
    ports = [c.prefill[0].metrics_port, c.decode[0].metrics_port]
    return all(_metric(p, "pdserve:kv_cache_usage_perc") == 0 and
               _metric(p, "pdserve:num_requests_running") == 0 for p in ports)


@pytest.mark.integration
@pytest.mark.parametrize("when", ["mid_prefill", "mid_decode"])
def test_cancel_frees_every_block_on_both_workers_within_1s(cluster: ClusterConfig,
                                                             when: str) -> None:
    prompt = list(range(1000, 1000 + 3000)) if when == "mid_prefill" else [1000] * 40

    async def scenario() -> None:
        client = AsyncClient(f"127.0.0.1:{cluster.router_port}")
        try:
            stream = client.generate(prompt, max_tokens=2000, ignore_eos=True)
            if when == "mid_prefill":
                task = asyncio.ensure_future(stream.__anext__())
                await asyncio.sleep(1.0)  # 3,000 tokens take seconds to prefill
                assert not task.done()
                task.cancel()
            else:
                async for _ in stream:
                    break
                await stream.aclose()
        finally:
            await client.close()

    asyncio.run(scenario())
    t0 = time.monotonic()
    while not _pool_empty(cluster):
        assert time.monotonic() - t0 < 1.0, "blocks still held 1 s after cancellation"
        time.sleep(0.05)


@pytest.mark.integration
def test_bad_requests_get_clear_statuses(cluster: ClusterConfig) -> None:
    async def scenario() -> None:
        client = AsyncClient(f"127.0.0.1:{cluster.router_port}")
        try:
            for kwargs, code in [({"prompt": ""}, grpc.StatusCode.INVALID_ARGUMENT),
                                 ({"prompt": "hi", "temperature": -1.0},
                                  grpc.StatusCode.INVALID_ARGUMENT),
                                 ({"prompt": [5] * 9000}, grpc.StatusCode.INVALID_ARGUMENT)]:
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    async for _ in client.generate(**kwargs):  # type: ignore[arg-type]
                        pass
                assert e.value.code() == code and e.value.details()
            out = [d async for d in client.generate("Hello", max_tokens=3, ignore_eos=True)]
            assert sum(len(d.token_ids) for d in out) == 3  # still serving
        finally:
            await client.close()

    asyncio.run(scenario())


@pytest.mark.integration
def test_int8_kv_agreement_with_unquantized_path(cluster: ClusterConfig) -> None:
    """Share of identical greedy continuations with int8 KV on the wire vs fp32 KV."""
    import json

    def run(encoding: int) -> list[list[int]]:
        async def go() -> list[list[int]]:
            client = AsyncClient(f"127.0.0.1:{cluster.router_port}", timeout=300)
            try:
                async def one(q: str) -> list[int]:
                    return [t async for d in client.generate(
                        messages=[{"role": "user", "content": q}], max_tokens=N_NEW,
                        ignore_eos=True, kv_encoding=encoding) for t in d.token_ids]
                return list(await asyncio.gather(*(one(q) for q in QUESTIONS)))
            finally:
                await client.close()
        return asyncio.run(go())

    exact, int8 = run(0), run(4)
    share = sum(a == b for a, b in zip(exact, int8, strict=True)) / len(QUESTIONS)
    first8 = sum(a[:8] == b[:8] for a, b in zip(exact, int8, strict=True)) / len(QUESTIONS)
    out = Path(__file__).resolve().parents[2] / "bench" / "results" / "int8_kv_agreement.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"prompts": len(QUESTIONS), "new_tokens": N_NEW,
                               "identical_share": share, "identical_first8_share": first8},
                              indent=2) + "\n")
    print(f"int8 KV: {share:.0%} identical {N_NEW}-token continuations, {first8:.0%} first 8")
    assert first8 >= 0.5
