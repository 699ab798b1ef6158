"""The router when workers fail (router/generation.py over fake decode workers):
a decode worker that dies mid-stream is migrated (prompt plus the tokens so far,
budgets reduced, one uninterrupted stream), errors name the role that failed, the
request deadline ends a stalled call with DEADLINE_EXCEEDED, REMOTE plans skip
prefill workers that are down. Each test ends with nothing in flight."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Coroutine
from typing import Any

import pytest

from pdserve.metrics import RouterMetrics
from pdserve.sampling_params import SamplingParams
from router.generation import Generator
from router.health import DecodeHealth
from router.request import Delta, GenerateRequest, GenerationError
from tests.router_fakes import (
    FakeDecodeBackend,
    FakeDecodeWorker,
    FakeTokenizer,
    load_aware,
    nothing_in_flight,
)

PROMPT = list(range(1, 21))  # 20 tokens: REMOTE at the default threshold; tokens 100, 101, ...


def run(coro: Coroutine[Any, Any, Any]) -> Any:
    return asyncio.run(asyncio.wait_for(coro, timeout=20))


def request(rid: str = "r", max_tokens: int = 5, min_tokens: int = 0,
            timeout: float | None = None) -> GenerateRequest:
    return GenerateRequest(params=SamplingParams(max_tokens=max_tokens, min_tokens=min_tokens),
                           request_id=rid, token_ids=PROMPT, timeout=timeout)


def generator(backend: FakeDecodeBackend, decode: list[str], prefill: list[str] = (),  # type: ignore[assignment]
              **kw: Any) -> Generator:
    return Generator("fake-model", FakeTokenizer(), load_aware(decode, prefill), 64, backend,
                     RouterMetrics("fake-model"), **kw)


async def collect(stream: AsyncGenerator[Delta]) -> list[Delta]:
    return [d async for d in stream]


def sample(g: Generator, name: str) -> float:
    value = g.metrics.registry.get_sample_value(
        f"pdserve:{name}", {"model_name": "fake-model", "role": "router"})
    return value or 0.0


def assert_idle(g: Generator, backend: FakeDecodeBackend) -> None:
    assert g.running == 0 and backend.open_streams == 0
    assert nothing_in_flight(g.policy)  # type: ignore[arg-type]


def test_a_decode_worker_dying_mid_stream_is_migrated_and_the_stream_goes_on() -> None:
    dying = FakeDecodeWorker("d:1", fail_after=2, fail_code="UNAVAILABLE")
    backend = FakeDecodeBackend([dying, FakeDecodeWorker("d:2")])
    g = generator(backend, ["d:1", "d:2"], ["p:1"])
    g.policy.decode[1].in_flight_tokens = 1  # type: ignore[attr-defined]  # d:1 first
    deltas = run(collect(g.generate(request(max_tokens=5, min_tokens=4))))
    g.policy.decode[1].in_flight_tokens = 0  # type: ignore[attr-defined]
    assert [t for d in deltas for t in d.token_ids] == [100, 101, 102, 103, 104]
    assert "".join(d.text for d in deltas) == " t100 t101 t102 t103 t104"
    last = deltas[-1]
    assert (last.finish_reason, last.prompt_tokens, last.completion_tokens) == ("length", 20, 5)
    resumed = backend.workers["d:2"].jobs[0]
    assert resumed.request_id == "r" and resumed.prompt == [*PROMPT, 100, 101]
    assert (resumed.params.max_tokens, resumed.params.min_tokens) == (3, 2)
    assert resumed.prefill_address == "p:1"  # 22 tokens: planned REMOTE again
    assert sample(g, "request_migrations_total") == 1
    assert sample(g, "requests_aborted_total") == 0
    assert sample(g, "time_to_first_token_seconds_count") == 1  # one first token, not two
    assert sample(g, "prompt_tokens_total") == 20
    assert_idle(g, backend)


def test_a_worker_unreachable_before_the_first_token_is_moved_too() -> None:
    backend = FakeDecodeBackend([FakeDecodeWorker("d:1", fail_after=0, fail_code="UNAVAILABLE"),
                                 FakeDecodeWorker("d:2")])
    g = generator(backend, ["d:1", "d:2"])
    g.policy.decode[1].in_flight_tokens = 1  # type: ignore[attr-defined]
    deltas = run(collect(g.generate(request(max_tokens=3))))
    g.policy.decode[1].in_flight_tokens = 0  # type: ignore[attr-defined]
    assert [t for d in deltas for t in d.token_ids] == [100, 101, 102]
    assert backend.workers["d:2"].jobs[0].prompt == PROMPT
    assert_idle(g, backend)


@pytest.mark.parametrize("limit", [0, 1])
def test_without_migration_or_past_its_limit_the_decode_workers_failure_is_the_answer(
        limit: int) -> None:
    workers = [FakeDecodeWorker(f"d:{i}", fail_after=1, fail_code="UNAVAILABLE") for i in (1, 2)]
    backend = FakeDecodeBackend(workers)
    g = generator(backend, ["d:1", "d:2"], migration_limit=limit)
    got: list[Delta] = []

    async def consume() -> None:
        async for d in g.generate(request()):
            got.append(d)

    with pytest.raises(GenerationError) as e:
        run(consume())
    assert e.value.code == "UNAVAILABLE" and "decode worker d:" in e.value.message
    assert "full" not in e.value.message
    assert len(got) == limit + 1 and sample(g, "request_migrations_total") == limit
    assert sum(len(w.jobs) for w in workers) == limit + 1
    assert_idle(g, backend)


def test_a_dying_worker_with_no_other_to_move_to_fails_naming_it() -> None:
    backend = FakeDecodeBackend([FakeDecodeWorker("d:1", fail_after=2, fail_code="UNAVAILABLE")])
    g = generator(backend, ["d:1"], migration_limit=1)
    with pytest.raises(GenerationError) as e:
        run(collect(g.generate(request())))
    assert e.value.code == "UNAVAILABLE"
    assert e.value.message == "decode worker d:1: the decode worker broke"  # not "full"
    assert len(backend.workers["d:1"].jobs) == 2  # waited for it, moved back once
    assert_idle(g, backend)


def test_a_migrating_request_waits_for_its_only_worker_to_come_back() -> None:
    """No other decode worker up: the request waits for the restarted one (found by
    pdserve bench --chaos: both decode workers killed within one health probe)."""
    backend = FakeDecodeBackend([FakeDecodeWorker("d:1", fail_after=2, fail_code="UNAVAILABLE")])
    g = generator(backend, ["d:1"])
    deltas = run(collect(g.generate(request(max_tokens=5))))
    assert [t for d in deltas for t in d.token_ids] == [100, 101, 102, 103, 104]
    assert backend.workers["d:1"].jobs[1].prompt == [*PROMPT, 100, 101]
    assert sample(g, "request_migrations_total") == 2
    assert_idle(g, backend)


@pytest.mark.parametrize("code", ["RESOURCE_EXHAUSTED", "UNAVAILABLE"])
def test_a_failure_blamed_on_the_prefill_is_neither_decode_full_nor_migrated(code: str) -> None:
    blamed = FakeDecodeWorker("d:1", fail_after=0, fail_code=code, fail_role="prefill")
    backend = FakeDecodeBackend([blamed, FakeDecodeWorker("d:2")])
    g = generator(backend, ["d:1", "d:2"], ["p:1"])
    g.policy.decode[1].in_flight_tokens = 1  # type: ignore[attr-defined]
    with pytest.raises(GenerationError) as e:
        run(collect(g.generate(request())))
    g.policy.decode[1].in_flight_tokens = 0  # type: ignore[attr-defined]
    assert e.value.code == code and e.value.message.startswith("prefill failed")
    assert "every decode worker is full" not in e.value.message
    assert not backend.workers["d:2"].jobs and sample(g, "request_migrations_total") == 0
    assert_idle(g, backend)


def test_the_request_deadline_ends_a_stalled_call_with_deadline_exceeded() -> None:
    stalled = FakeDecodeWorker("d:1", hold_after=1)  # one token, then silence
    backend = FakeDecodeBackend([stalled])
    g = generator(backend, ["d:1"], request_timeout_s=0.5)
    got: list[Delta] = []

    async def consume() -> None:
        async for d in g.generate(request()):
            got.append(d)

    with pytest.raises(GenerationError) as e:
        run(consume())
    assert e.value.code == "DEADLINE_EXCEEDED" and "0.5 s" in e.value.message
    assert len(got) == 1 and stalled.streams[0].cancelled  # the call was cancelled
    assert 0 < stalled.jobs[0].timeout <= 0.5  # type: ignore[operator]  # the worker knows it
    assert_idle(g, backend)


def test_the_clients_deadline_applies_when_shorter_and_is_capped_when_longer() -> None:
    worker = FakeDecodeWorker("d:1")
    backend = FakeDecodeBackend([worker])
    g = generator(backend, ["d:1"], request_timeout_s=30)
    run(collect(g.generate(request("a", timeout=5))))
    run(collect(g.generate(request("b", timeout=3600))))
    run(collect(g.generate(request("c"))))
    a, b, c = (j.timeout for j in worker.jobs)
    assert a is not None and b is not None and c is not None
    assert 4 < a <= 5 and 29 < b <= 30 and 29 < c <= 30
    assert_idle(g, backend)


def test_remote_plans_go_only_to_prefill_workers_up_the_others_their_fallbacks() -> None:
    p1, p2, p3 = FakeDecodeWorker("p:1"), FakeDecodeWorker("p:2"), FakeDecodeWorker("p:3")
    d = FakeDecodeWorker("d:1")
    backend = FakeDecodeBackend([d, p1, p2, p3])

    async def ignore(usable: bool) -> None:
        pass

    prefill_health = DecodeHealth(["p:1", "p:2", "p:3"], backend, ignore, role="prefill")
    g = generator(backend, ["d:1"], ["p:1", "p:2", "p:3"], prefill_health=prefill_health)

    async def scenario() -> None:
        await prefill_health.probe_all()
        await collect(g.generate(request("all-up")))
        p1.serving = False
        await prefill_health.probe_all()
        await collect(g.generate(request("p1-down")))
        p2.serving = p3.serving = None  # no answer: down only after 3 misses
        for _ in range(3):
            await prefill_health.probe_all()
        await collect(g.generate(request("all-down")))

    run(scenario())
    plans = [(j.prefill_address, j.fallback_prefill) for j in d.jobs]
    assert plans == [("p:1", ("p:2", "p:3")), ("p:2", ("p:3",)), (None, ())]
    assert_idle(g, backend)


def test_an_http_request_past_the_deadline_gets_a_504_envelope_and_frees_its_call() -> None:
    import aiohttp

    from router.openai_http import OpenAIServer

    stalled = FakeDecodeWorker("d:1", hold_after=0)  # never a token
    backend = FakeDecodeBackend([stalled])
    g = generator(backend, ["d:1"], request_timeout_s=0.5)

    async def scenario() -> tuple[int, dict[str, Any]]:
        server = OpenAIServer(g, g.metrics.registry, None, lambda: True)
        await server.start("127.0.0.1", 0)
        try:
            async with aiohttp.ClientSession() as s, s.post(
                    f"http://127.0.0.1:{server.port}/v1/completions",
                    json={"model": "fake-model", "prompt": PROMPT, "max_tokens": 4}) as r:
                return r.status, await r.json()
        finally:
            await server.stop()

    status, body = run(scenario())
    assert status == 504, body
    assert "deadline" in body["error"]["message"]
    assert stalled.streams[0].cancelled
    assert_idle(g, backend)


def test_the_next_call_carries_the_tokens_so_far_and_a_lost_finish_ends_the_stream() -> None:
    from router.migration import next_call, nothing_left

    p = SamplingParams(max_tokens=5, min_tokens=4)
    assert next_call([1, 2], [], p) == ([1, 2], p)
    prompt, q = next_call([1, 2], [7, 8, 9], p)
    assert (prompt, q.max_tokens, q.min_tokens) == ([1, 2, 7, 8, 9], 2, 1)
    assert nothing_left([1, 2], [7] * 5, p, 64)  # max_tokens all streamed
    assert nothing_left([1, 2], [7] * 3, p, 5)  # the context is full
    assert not nothing_left([1, 2], [7] * 3, p, 64)
