"""The router's request lifecycle (router/generation.py) over fake decode workers:
ROUTING → DISPATCHED → STREAMING → DONE, the retry on a full decode worker, worker
errors, Abort and a client that goes away. Each test ends with nothing in flight:
no request held, every policy count zero, every fake call closed."""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import logging
from collections.abc import AsyncGenerator, Coroutine
from typing import Any

import pytest

from pdserve.logs import current_request_id
from pdserve.sampling_params import SamplingParams
from router.generation import Generator, Stage
from router.health import DecodeHealth
from router.policy import LoadAwarePolicy
from router.request import Delta, GenerateRequest, GenerationError
from tests.router_fakes import (
    FakeDecodeBackend,
    FakeDecodeWorker,
    RecordingPolicy,
    load_aware,
    make_generator,
    nothing_in_flight,
)

PROMPT = list(range(1, 21))  # 20 tokens: REMOTE at the default threshold (16)


def run(coro: Coroutine[Any, Any, Any]) -> Any:
    return asyncio.run(asyncio.wait_for(coro, timeout=10))


def request(rid: str = "r1", max_tokens: int = 3, prompt: list[int] = PROMPT) -> GenerateRequest:
    return GenerateRequest(params=SamplingParams(max_tokens=max_tokens), request_id=rid,
                           token_ids=prompt)


async def collect(stream: AsyncGenerator[Delta]) -> list[Delta]:
    return [d async for d in stream]


def aborted_total(g: Generator) -> float:
    value = g.metrics.registry.get_sample_value(
        "pdserve:requests_aborted_total", {"model_name": "fake-model", "role": "router"})
    return value or 0.0


def assert_idle(g: Generator, backend: FakeDecodeBackend) -> None:
    assert g.running == 0 and g.waiting == 0
    assert backend.open_streams == 0
    if isinstance(g.policy, LoadAwarePolicy):
        assert nothing_in_flight(g.policy)


def test_a_request_streams_to_done() -> None:
    backend = FakeDecodeBackend([FakeDecodeWorker("d:1")])
    g = make_generator(backend, load_aware(["d:1"], ["p:1"]))
    deltas = run(collect(g.generate(request("client-id"))))
    assert [d.token_ids for d in deltas] == [[100], [101], [102]]
    assert [d.request_id for d in deltas] == ["client-id"] * 3
    last = deltas[-1]
    assert (last.finish_reason, last.prompt_tokens, last.completion_tokens) == ("length", 20, 3)
    assert last.timings is not None and last.timings.plan == "remote"
    assert last.timings.kv_bytes == 64 and last.timings.ttft_s > 0
    job = backend.workers["d:1"].jobs[0]
    assert job.request_id == "client-id"  # the decode worker logs the client's id
    assert (job.prompt, job.prefill_address) == (PROMPT, "p:1")
    assert aborted_total(g) == 0
    assert_idle(g, backend)


def test_a_request_without_an_id_gets_one_shared_with_the_decode_worker() -> None:
    backend = FakeDecodeBackend([FakeDecodeWorker("d:1")])
    g = make_generator(backend, load_aware(["d:1"]))
    deltas = run(collect(g.generate(request(rid=""))))
    rid = deltas[0].request_id
    assert rid.startswith("req-") and backend.workers["d:1"].jobs[0].request_id == rid
    assert_idle(g, backend)


def test_the_plan_follows_the_prompt_length() -> None:
    backend = FakeDecodeBackend([FakeDecodeWorker("d:1")])
    g = make_generator(backend, load_aware(["d:1"], ["p:1"], local_prefill_below=16))
    short = run(collect(g.generate(request("short", prompt=PROMPT[:15]))))
    at = run(collect(g.generate(request("at", prompt=PROMPT[:16]))))
    assert [j.prefill_address for j in backend.workers["d:1"].jobs] == [None, "p:1"]
    assert short[-1].timings is not None and short[-1].timings.plan == "local"
    assert at[-1].timings is not None and at[-1].timings.plan == "remote"
    assert_idle(g, backend)


def test_cached_prompt_tokens_reach_the_usage_and_a_worker_cannot_claim_more() -> None:
    worker = FakeDecodeWorker("d:1", cached_tokens=16)
    backend = FakeDecodeBackend([worker])
    g = make_generator(backend, load_aware(["d:1"]))
    last = run(collect(g.generate(request("hit"))))[-1]
    assert (last.prompt_tokens, last.cached_tokens) == (20, 16)
    worker.cached_tokens = 10**6  # more than the prompt has: clamped
    assert run(collect(g.generate(request("liar"))))[-1].cached_tokens == 20
    assert_idle(g, backend)


def test_the_policy_picks_the_kv_encoding_unless_the_client_named_one() -> None:
    backend = FakeDecodeBackend([FakeDecodeWorker("d:1")])
    policy = RecordingPolicy(["d:1"], ["p:1"])
    policy.kv_encoding = 4  # int8: a slow link
    g = make_generator(backend, policy)
    run(collect(g.generate(request("auto"))))
    named = dataclasses.replace(request("named"), kv_encoding=2)  # bf16, the client's
    run(collect(g.generate(named)))
    assert [j.kv_encoding for j in backend.workers["d:1"].jobs] == [4, 2]
    assert_idle(g, backend)


def test_the_policy_hears_the_whole_life_of_a_request() -> None:
    backend = FakeDecodeBackend([FakeDecodeWorker("d:1", full_calls=1), FakeDecodeWorker("d:2")])
    policy = RecordingPolicy(["d:1", "d:2"])
    g = make_generator(backend, policy)
    run(collect(g.generate(request("r"))))
    assert policy.events == [("dispatched", "d:1"), ("ended", "r"), ("dispatched", "d:2"),
                             ("prefill_finished", "r"), ("ended", "r")]
    assert_idle(g, backend)


def test_a_full_decode_worker_hands_the_request_to_the_next() -> None:
    full, free = FakeDecodeWorker("d:1", full_calls=1), FakeDecodeWorker("d:2")
    backend = FakeDecodeBackend([full, free])
    policy = load_aware(["d:1", "d:2"])
    policy.decode[1].in_flight_tokens = 1  # d:1 is chosen first
    g = make_generator(backend, policy)
    deltas = run(collect(g.generate(request("r"))))
    policy.decode[1].in_flight_tokens = 0
    assert deltas[-1].finish_reason == "length" and len(deltas) == 3
    assert [len(full.jobs), len(free.jobs)] == [1, 1]
    assert aborted_total(g) == 0  # a retry is not an abort
    assert_idle(g, backend)


def test_every_decode_worker_full_is_resource_exhausted() -> None:
    workers = [FakeDecodeWorker("d:1", full_calls=1), FakeDecodeWorker("d:2", full_calls=1)]
    backend = FakeDecodeBackend(workers)
    g = make_generator(backend, load_aware(["d:1", "d:2"]))
    with pytest.raises(GenerationError) as e:
        run(collect(g.generate(request("r"))))
    assert e.value.code == "RESOURCE_EXHAUSTED"
    assert [len(w.jobs) for w in workers] == [1, 1]  # each tried once
    assert_idle(g, backend)


def test_full_after_the_first_token_is_an_error_not_a_retry() -> None:
    worker = FakeDecodeWorker("d:1", fail_after=1, fail_code="RESOURCE_EXHAUSTED")
    backend = FakeDecodeBackend([worker, FakeDecodeWorker("d:2")])
    g = make_generator(backend, RecordingPolicy(["d:1", "d:2"]))
    with pytest.raises(GenerationError) as e:
        run(collect(g.generate(request("r"))))
    assert e.value.code == "RESOURCE_EXHAUSTED" and "d:1" in e.value.message
    assert not backend.workers["d:2"].jobs
    assert_idle(g, backend)


def test_a_worker_failing_mid_stream_fails_the_request() -> None:
    backend = FakeDecodeBackend([FakeDecodeWorker("d:1", fail_after=2, fail_code="INTERNAL")])
    g = make_generator(backend, load_aware(["d:1"], ["p:1"]))
    got: list[Delta] = []

    async def consume() -> None:
        async for d in g.generate(request("r", max_tokens=5)):
            got.append(d)

    with pytest.raises(GenerationError) as e:
        run(consume())
    assert (e.value.code, len(got)) == ("INTERNAL", 2)
    assert "decode worker d:1" in e.value.message
    assert aborted_total(g) == 1
    assert_idle(g, backend)


def test_no_decode_worker_is_unavailable() -> None:
    backend = FakeDecodeBackend([])
    g = make_generator(backend, load_aware([]))
    with pytest.raises(GenerationError) as e:
        run(collect(g.generate(request("r"))))
    assert e.value.code == "UNAVAILABLE"
    assert_idle(g, backend)


def test_abort_ends_the_stream_with_finish_reason_abort() -> None:
    worker = FakeDecodeWorker("d:1", hold_after=1)
    backend = FakeDecodeBackend([worker])
    g = make_generator(backend, load_aware(["d:1"], ["p:1"]))

    async def scenario() -> list[Delta]:
        stream = g.generate(request("r", max_tokens=5))
        first = await stream.__anext__()
        assert g.stage("r") is Stage.STREAMING and not g.abort("other")
        assert g.abort("r")
        return [first, *[d async for d in stream]]

    deltas = run(scenario())
    last = deltas[-1]
    assert (last.finish_reason, last.prompt_tokens, last.completion_tokens) == ("abort", 20, 1)
    assert worker.streams[0].cancelled and aborted_total(g) == 1
    assert_idle(g, backend)


def test_abort_before_the_first_token() -> None:
    worker = FakeDecodeWorker("d:1", hold_after=0)
    backend = FakeDecodeBackend([worker])
    policy = load_aware(["d:1"], ["p:1"])
    g = make_generator(backend, policy)

    async def scenario() -> list[Delta]:
        task = asyncio.create_task(collect(g.generate(request("r"))))
        await worker.holding.wait()
        assert g.stage("r") is Stage.DISPATCHED and policy.prefill[0].in_flight_requests == 1
        assert g.abort("r")
        return await task

    deltas = run(scenario())
    assert [(d.finish_reason, d.completion_tokens) for d in deltas] == [("abort", 0)]
    assert_idle(g, backend)


def test_a_client_going_away_cancels_the_decode_call() -> None:
    worker = FakeDecodeWorker("d:1", hold_after=1)
    backend = FakeDecodeBackend([worker])
    g = make_generator(backend, load_aware(["d:1"], ["p:1"]))

    async def scenario() -> None:
        stream = g.generate(request("r", max_tokens=5))
        await stream.__anext__()
        assert g.running == 1
        await stream.aclose()  # what the servers do when their client disconnects

    run(scenario())
    assert worker.streams[0].cancelled and aborted_total(g) == 1
    assert_idle(g, backend)


def test_a_cancelled_task_cancels_the_decode_call() -> None:
    worker = FakeDecodeWorker("d:1", hold_after=1)
    backend = FakeDecodeBackend([worker])
    g = make_generator(backend, load_aware(["d:1"]))

    async def scenario() -> None:
        task = asyncio.create_task(collect(g.generate(request("r", max_tokens=5))))
        await worker.holding.wait()
        task.cancel()  # the deadline, or a gRPC client that went away
        with pytest.raises(asyncio.CancelledError):
            await task

    run(scenario())
    assert worker.streams[0].cancelled and aborted_total(g) == 1
    assert_idle(g, backend)


def test_a_stream_dropped_unclosed_is_released_by_the_loop() -> None:
    """A server that drops a stream without closing it (gRPC may, on a cancel):
    the event loop's finalizer closes it in a task of its own, cleanly."""
    worker = FakeDecodeWorker("d:1", hold_after=1)
    backend = FakeDecodeBackend([worker])
    g = make_generator(backend, load_aware(["d:1"], ["p:1"]))
    errors: list[dict[str, Any]] = []

    async def consume_one() -> None:
        stream = g.generate(request("r", max_tokens=5))
        await stream.__anext__()

    async def scenario() -> None:
        asyncio.get_running_loop().set_exception_handler(lambda _, ctx: errors.append(ctx))
        await asyncio.create_task(consume_one())
        gc.collect()
        while g.running or backend.open_streams:  # the finalizer's tasks run
            await asyncio.sleep(0)

    run(scenario())
    assert errors == [] and worker.streams[0].cancelled and aborted_total(g) == 1
    assert_idle(g, backend)


def test_refusals_before_routing() -> None:
    worker = FakeDecodeWorker("d:1", hold_after=0)
    backend = FakeDecodeBackend([worker])
    g = make_generator(backend, load_aware(["d:1"]), max_model_len=20)

    async def scenario() -> None:
        task = asyncio.create_task(collect(g.generate(request("dup", prompt=[1, 2]))))
        await worker.holding.wait()
        with pytest.raises(GenerationError) as e:
            await collect(g.generate(request("dup", prompt=[1, 2])))
        assert (e.value.code, e.value.param) == ("ALREADY_EXISTS", "request_id")
        assert g.running == 1
        worker.release()
        await task

    run(scenario())
    for bad, param in ((request(prompt=[]), "prompt"), (request(prompt=[1, 5000]), "prompt"),
                       (request(prompt=PROMPT), "prompt")):  # 20 tokens >= max_model_len
        with pytest.raises(GenerationError) as e:
            run(collect(g.generate(bad)))
        assert (e.value.code, e.value.param) == ("INVALID_ARGUMENT", param)
    g.draining = True
    with pytest.raises(GenerationError) as e:
        run(collect(g.generate(request(prompt=[1]))))
    assert e.value.code == "UNAVAILABLE"
    assert len(worker.jobs) == 1
    assert_idle(g, backend)


def test_workers_down_are_skipped_and_none_up_is_unavailable() -> None:
    down, up = FakeDecodeWorker("d:1", serving=False), FakeDecodeWorker("d:2")
    backend = FakeDecodeBackend([down, up])
    changes: list[bool] = []

    async def on_change(usable: bool) -> None:
        changes.append(usable)

    health = DecodeHealth(["d:1", "d:2"], backend, on_change)
    g = make_generator(backend, load_aware(["d:1", "d:2"]), health)

    async def scenario() -> None:
        await health.probe_all()
        for i in range(3):  # rotation would offer d:1 in turn: health keeps it out
            await collect(g.generate(request(f"r{i}")))
        up.serving = False
        await health.probe_all()
        with pytest.raises(GenerationError) as e:
            await collect(g.generate(request("r")))
        assert e.value.code == "UNAVAILABLE"

    run(scenario())
    assert (len(down.jobs), len(up.jobs), changes) == (0, 3, [True, False])
    assert_idle(g, backend)


class _RequestIds(logging.Handler):
    """Each router log line with the request id bound when it was logged."""

    def __init__(self) -> None:
        super().__init__()
        self.lines: list[tuple[str, str | None, dict[str, Any]]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append((record.getMessage(), current_request_id(), record.__dict__))


def test_one_line_when_routed_and_one_when_ended_with_the_request_id_bound() -> None:
    backend = FakeDecodeBackend([FakeDecodeWorker("d:1")])
    g = make_generator(backend, load_aware(["d:1"], ["p:1"]))
    handler = _RequestIds()
    logger = logging.getLogger("router.generation")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)

    async def scenario() -> None:
        await collect(g.generate(request("rid-7")))
        assert current_request_id() is None  # unbound once the stream is over

    try:
        run(scenario())
    finally:
        logger.removeHandler(handler)
    assert [(msg, rid) for msg, rid, _ in handler.lines] == [
        ("request routed", "rid-7"), ("request ended", "rid-7")]
    routed, ended = handler.lines[0][2], handler.lines[1][2]
    assert (routed["decode"], routed["plan"], routed["prefill"], routed["prompt_tokens"]) == (
        "d:1", "remote", "p:1", 20)
    assert (ended["stage"], ended["finish_reason"], ended["completion_tokens"]) == (
        "done", "length", 3)
    assert ended["ttft_s"] > 0
    assert_idle(g, backend)
