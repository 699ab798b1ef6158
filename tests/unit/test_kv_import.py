"""The decode worker's KV import, step by step, with in-process KV sources (no gRPC):
RESERVED → RECEIVING → COMMITTED, FELL_BACK (the sender dies mid-stream) or
ABORTED (cancelled, hostile stream). Every path ends with every block free and no
engine queue open."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path

import grpc
import pytest

from decode_worker.fake_kv_sources import LoopbackKVSource, ScriptedKVSource
from decode_worker.servicer import DecodeServicer
from pdserve._proto.pdserve.v1 import common_pb2, worker_pb2, worker_pb2_grpc
from pdserve.config import EngineConfig, WorkerConfig
from pdserve.engine.async_engine import AsyncEngine
from pdserve.engine.engine import LLMEngine
from pdserve.engine.kv_import import ImportState, KVImport
from pdserve.kvwire.codec import Encoding
from pdserve.kvwire.stream import (
    FirstToken,
    KVChunk,
    KVEvent,
    KVHeader,
    KVRequest,
    KVStreamError,
    PeerFailed,
)
from pdserve.logs import current_request_id
from pdserve.sampling_params import SamplingParams
from pdserve.worker_host import start_worker
from tests.engine_helpers import run_all, wait_engines_empty, wait_streams_closed

PROMPT = list(range(5, 75))  # 70 tokens: 3 prefill chunks of at most 32
PARAMS = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
Scenario = Callable[[AsyncEngine, AsyncEngine], Awaitable[None]]


def _config(model: Path) -> EngineConfig:
    return EngineConfig(model=str(model), dtype="float32", num_kv_blocks=64,
                        max_num_batched_tokens=32)


@pytest.fixture(scope="module")
def reference(tiny_llama: Path) -> list[int]:
    e = LLMEngine(_config(tiny_llama))
    e.add_request("ref", PROMPT, PARAMS)
    return run_all(e)["ref"].token_ids  # type: ignore[attr-defined]


def _run(model: Path, scenario: Scenario) -> None:
    """``scenario(decode, prefill)`` on two started engines, then both must be empty."""
    async def main() -> None:
        d, p = AsyncEngine(LLMEngine(_config(model))), AsyncEngine(LLMEngine(_config(model)))
        d.start()
        p.start()
        try:
            await scenario(d, p)
            await _settled(d, p)
        finally:
            d.stop()
            p.stop()

    asyncio.run(main())


async def _settled(*engines: AsyncEngine) -> None:
    await wait_engines_empty(*(e.engine for e in engines))
    await wait_streams_closed(*engines)


def _ask(rid: str = "r") -> KVRequest:
    return KVRequest(rid, PROMPT, PARAMS, Encoding.MODEL)


async def _recorded(p: AsyncEngine) -> list[KVEvent]:
    return await LoopbackKVSource(p).record(_ask("rec"))


def _payload_bytes(events: list[KVEvent]) -> int:
    return sum(e.payload.nbytes for e in events if isinstance(e, KVChunk))


def _reserved_blocks(d: AsyncEngine) -> int:
    return d.engine.blocks.num_blocks - d.engine.blocks.num_free_blocks


async def _tokens(stream) -> list[int]:  # type: ignore[no-untyped-def]
    tokens: list[int] = []
    async for out in stream.outputs():
        tokens += out.new_token_ids
    return tokens


def test_commit_then_decode_gives_the_engine_alone_tokens(tiny_llama: Path,
                                                         reference: list[int]) -> None:
    async def scenario(d: AsyncEngine, p: AsyncEngine) -> None:
        async with d.request("r") as stream:
            imp = await stream.reserve_import(PROMPT, PARAMS, Encoding.MODEL)
            assert imp.state is ImportState.RESERVED
            assert _reserved_blocks(d) == d.engine.blocks.blocks_for_tokens(len(PROMPT) + 1)
            events = await _recorded(p)
            assert imp.bytes_pending == _payload_bytes(events)  # all of it
            await imp.run(LoopbackKVSource(p).prefill("p", _ask(), 30), fall_back=False)
            assert imp.state is ImportState.COMMITTED
            assert imp.stats.bytes == _payload_bytes(events)  # chunked apart, the same bytes
            assert imp.bytes_pending == 0
            assert await _tokens(stream) == reference

    _run(tiny_llama, scenario)


async def _warm(d: AsyncEngine, prompt: list[int]) -> None:
    """Run ``prompt`` on ``d`` so its prefix cache holds the prompt's full blocks."""
    async with d.request("warm") as stream:
        await stream.add(prompt, SamplingParams(temperature=0, max_tokens=1))
        await _tokens(stream)


def test_import_asks_only_for_what_the_prefix_cache_lacks(tiny_llama: Path,
                                                         reference: list[int]) -> None:
    async def scenario(d: AsyncEngine, p: AsyncEngine) -> None:
        await _warm(d, [*PROMPT[:40], 1, 2, 3])  # d holds PROMPT's first 2 blocks
        full = sum(1 for e in await _recorded(p) if isinstance(e, KVChunk))
        async with d.request("r") as stream:
            imp = await stream.reserve_import(PROMPT, PARAMS, Encoding.MODEL)
            assert imp.num_cached_tokens == 32
            delta = dataclasses.replace(_ask(), num_cached_tokens=imp.num_cached_tokens)
            events = await LoopbackKVSource(p).record(delta)
            header = events[0]
            assert isinstance(header, KVHeader) and header.num_cached_tokens == 32
            chunks = [e for e in events if isinstance(e, KVChunk)]
            assert min(c.token_offset for c in chunks) == 32 and len(chunks) < full
            await imp.run(ScriptedKVSource(events).prefill("p", delta, 30), fall_back=False)
            assert imp.state is ImportState.COMMITTED
            assert await _tokens(stream) == reference

    _run(tiny_llama, scenario)


def test_a_sender_that_ignores_the_cached_prefix_is_still_right(
        tiny_llama: Path, reference: list[int]) -> None:
    """An older prefill worker sends every row: the cached (shared) blocks are not
    written, the rest is, and the tokens are the same."""
    async def scenario(d: AsyncEngine, p: AsyncEngine) -> None:
        await _warm(d, [*PROMPT[:40], 1, 2, 3])
        async with d.request("r") as stream:
            imp = await stream.reserve_import(PROMPT, PARAMS, Encoding.MODEL)
            assert imp.num_cached_tokens == 32
            await imp.run(LoopbackKVSource(p).prefill("p", _ask(), 30), fall_back=False)
            assert imp.state is ImportState.COMMITTED
            assert await _tokens(stream) == reference

    _run(tiny_llama, scenario)


def test_a_header_claiming_more_cached_tokens_than_asked_is_refused(
        tiny_llama: Path) -> None:
    async def scenario(d: AsyncEngine, p: AsyncEngine) -> None:
        events = await _recorded(p)
        header = dataclasses.replace(events[0], num_cached_tokens=16)  # type: ignore[type-var]
        async with d.request("r") as stream:
            imp = await stream.reserve_import(PROMPT, PARAMS, Encoding.MODEL)
            assert imp.num_cached_tokens == 0  # d's cache is cold
            src = ScriptedKVSource([header, *events[1:]])
            with pytest.raises(KVStreamError, match="skips 16 tokens") as e:
                await imp.run(src.prefill("p", _ask(), 30), fall_back=False)
            assert e.value.code == "INVALID_ARGUMENT" and imp.state is ImportState.ABORTED

    _run(tiny_llama, scenario)


def test_sender_dies_mid_stream_falls_back_to_a_local_prefill(tiny_llama: Path,
                                                              reference: list[int]) -> None:
    async def scenario(d: AsyncEngine, p: AsyncEngine) -> None:
        died = PeerFailed("UNAVAILABLE", "prefill worker p: connection reset")
        src = ScriptedKVSource(await _recorded(p), fail=died, fail_after=4)
        async with d.request("r") as stream:
            imp = await stream.reserve_import(PROMPT, PARAMS, Encoding.MODEL)
            await imp.run(src.prefill("p", _ask(), 30), fall_back=True)
            assert imp.state is ImportState.FELL_BACK and imp.error is died
            assert src.sent == 4 and src.closed
            assert await _tokens(stream) == reference

    _run(tiny_llama, scenario)


def test_sender_dies_without_fallback_aborts(tiny_llama: Path) -> None:
    async def scenario(d: AsyncEngine, p: AsyncEngine) -> None:
        src = ScriptedKVSource(await _recorded(p), fail=PeerFailed("UNAVAILABLE", "gone"),
                               fail_after=4)
        async with d.request("r") as stream:
            imp = await stream.reserve_import(PROMPT, PARAMS, Encoding.MODEL)
            with pytest.raises(PeerFailed):
                await imp.run(src.prefill("p", _ask(), 30), fall_back=False)
            assert imp.state is ImportState.ABORTED

    _run(tiny_llama, scenario)


def test_cancelled_mid_receive_aborts_and_frees(tiny_llama: Path) -> None:
    async def scenario(d: AsyncEngine, p: AsyncEngine) -> None:
        events = await _recorded(p)
        src = ScriptedKVSource(events, fail_after=3, stall=asyncio.Event())
        async with d.request("r") as stream:
            imp = await stream.reserve_import(PROMPT, PARAMS, Encoding.MODEL)
            task = asyncio.create_task(imp.run(src.prefill("p", _ask(), 30), fall_back=True))
            await src.stalled.wait()
            assert imp.state is ImportState.RECEIVING and _reserved_blocks(d) > 0
            # The link's backlog: what the first 3 events (header, 2 chunks) left.
            assert imp.bytes_pending == _payload_bytes(events) - _payload_bytes(events[:3])
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert imp.state is ImportState.ABORTED and src.closed and imp.bytes_pending == 0

    _run(tiny_llama, scenario)


def _chunks(events: list[KVEvent]) -> list[int]:
    return [i for i, e in enumerate(events) if isinstance(e, KVChunk)]


def _other_model(events: list[KVEvent]) -> list[KVEvent]:
    h = events[0]
    assert isinstance(h, KVHeader)
    return [dataclasses.replace(h, num_layers=h.num_layers + 1), *events[1:]]


def _bad_crc(events: list[KVEvent]) -> list[KVEvent]:
    i = _chunks(events)[1]
    c = events[i]
    assert isinstance(c, KVChunk)
    events[i] = dataclasses.replace(c, crc32c=c.crc32c ^ 1)
    return events


def _out_of_order(events: list[KVEvent]) -> list[KVEvent]:
    i, j = _chunks(events)[:2]
    events[i], events[j] = events[j], events[i]
    return events


def _early_first_token(events: list[KVEvent]) -> list[KVEvent]:
    assert isinstance(events[-1], FirstToken)
    return [*events[:-2], events[-1], events[-2]]  # the last chunk comes too late


HOSTILE = {
    "other_model": (_other_model, "FAILED_PRECONDITION"),
    "crc": (_bad_crc, "DATA_LOSS"),
    "out_of_order": (_out_of_order, "DATA_LOSS"),
    "first_token_early": (_early_first_token, "DATA_LOSS"),
    "no_header": (lambda ev: ev[1:], "INVALID_ARGUMENT"),
    "no_first_token": (lambda ev: ev[:-1], "DATA_LOSS"),
}


@pytest.mark.parametrize("mode", list(HOSTILE))
def test_hostile_stream_aborts_with_its_status(tiny_llama: Path, mode: str) -> None:
    edit, code = HOSTILE[mode]

    async def scenario(d: AsyncEngine, p: AsyncEngine) -> None:
        src = ScriptedKVSource(await _recorded(p), edit=edit)
        async with d.request("r") as stream:
            imp = await stream.reserve_import(PROMPT, PARAMS, Encoding.MODEL)
            with pytest.raises(KVStreamError) as e:
                await imp.run(src.prefill("p", _ask(), 30), fall_back=True)  # never for these
            assert e.value.code == code, str(e.value)
            assert imp.state is ImportState.ABORTED and src.closed

    _run(tiny_llama, scenario)


@pytest.mark.parametrize("code", ["INVALID_ARGUMENT", "FAILED_PRECONDITION", "UNKNOWN"])
def test_peer_status_that_is_not_its_own_fault_never_retries_nor_falls_back(
        tiny_llama: Path, code: str) -> None:
    async def scenario(d: AsyncEngine, p: AsyncEngine) -> None:
        src = ScriptedKVSource([], fail=PeerFailed(code, "bad request"), fail_after=0)
        spare = ScriptedKVSource(await _recorded(p))
        async with d.request("r") as stream:
            imp: KVImport = await stream.reserve_import(PROMPT, PARAMS, Encoding.MODEL)
            with pytest.raises(PeerFailed) as e:
                await imp.run(src.prefill("p", _ask(), 30), fall_back=True,
                              retries=[spare.prefill("q", _ask(), 30)])
            assert e.value.code == code and imp.state is ImportState.ABORTED
            assert spare.sent == 0 and imp.failures == []

    _run(tiny_llama, scenario)


@pytest.mark.parametrize("code", ["RESOURCE_EXHAUSTED", "DEADLINE_EXCEEDED", "UNAVAILABLE"])
def test_peer_fault_falls_back_to_a_local_prefill(tiny_llama: Path, reference: list[int],
                                                  code: str) -> None:
    """A full prefill worker (or one whose message was too large) is the peer's
    fault, like a dead one: the prompt is prefilled here."""
    async def scenario(d: AsyncEngine, p: AsyncEngine) -> None:
        full = PeerFailed(code, "prefill worker full")
        src = ScriptedKVSource([], fail=full, fail_after=0)
        async with d.request("r") as stream:
            imp = await stream.reserve_import(PROMPT, PARAMS, Encoding.MODEL)
            await imp.run(src.prefill("p", _ask(), 30), fall_back=True)
            assert imp.state is ImportState.FELL_BACK and imp.failures == [full]
            assert await _tokens(stream) == reference

    _run(tiny_llama, scenario)


def _other_prompt() -> KVRequest:
    """Same length as PROMPT, other tokens: KV that must not survive into PROMPT's."""
    return KVRequest("other", list(range(100, 100 + len(PROMPT))), PARAMS, Encoding.MODEL)


def test_peer_dies_midway_the_next_peer_delivers_and_nothing_half_written_survives(
        tiny_llama: Path, reference: list[int]) -> None:
    async def scenario(d: AsyncEngine, p: AsyncEngine) -> None:
        wrong = await LoopbackKVSource(p).record(_other_prompt())
        died = PeerFailed("UNAVAILABLE", "connection reset")
        # Every chunk but the last of another prompt's KV lands in the blocks first.
        first = ScriptedKVSource(wrong[:-2], fail=died, fail_after=len(wrong) - 2)
        second = ScriptedKVSource(await _recorded(p))
        async with d.request("r") as stream:
            imp = await stream.reserve_import(PROMPT, PARAMS, Encoding.MODEL)
            blocks = _reserved_blocks(d)
            await imp.run(first.prefill("p1", _ask(), 30), fall_back=False,
                          retries=[second.prefill("p2", _ask(), 30)])
            assert imp.state is ImportState.COMMITTED and imp.failures == [died]
            assert first.closed and second.closed and _reserved_blocks(d) == blocks
            assert imp.stats.bytes > 0
            assert await _tokens(stream) == reference

    _run(tiny_llama, scenario)


def test_a_silent_peer_times_out_and_the_next_one_delivers(tiny_llama: Path,
                                                          reference: list[int]) -> None:
    async def scenario(d: AsyncEngine, p: AsyncEngine) -> None:
        silent = ScriptedKVSource(await _recorded(p), fail_after=3, stall=asyncio.Event())
        second = ScriptedKVSource(await _recorded(p))
        async with d.request("r") as stream:
            imp = await stream.reserve_import(PROMPT, PARAMS, Encoding.MODEL)
            t0 = asyncio.get_running_loop().time()
            await imp.run(silent.prefill("p1", _ask(), 30), fall_back=False,
                          retries=[second.prefill("p2", _ask(), 30)], idle_timeout_s=0.3,
                          still_alive=[lambda: silent.is_alive("p1", 1),
                                       lambda: second.is_alive("p2", 1)])
            assert asyncio.get_running_loop().time() - t0 < 10  # not the call's 30 s
            assert imp.state is ImportState.COMMITTED and silent.closed
            assert silent.probes == 1  # asked once, did not answer: failed
            assert [f.code for f in imp.failures] == ["DEADLINE_EXCEEDED"]
            assert await _tokens(stream) == reference

    _run(tiny_llama, scenario)


def test_a_slow_peer_that_answers_its_health_probe_is_waited_for(
        tiny_llama: Path, reference: list[int]) -> None:
    """Busy, not dead: a prefill queued behind others sends its header, then nothing
    for a while; it answers its probe, so the import keeps waiting for it."""
    async def scenario(d: AsyncEngine, p: AsyncEngine) -> None:
        go_on = asyncio.Event()
        busy = ScriptedKVSource(await _recorded(p), fail_after=1, stall=go_on, alive=True)
        spare = ScriptedKVSource(await _recorded(p))
        async with d.request("r") as stream:
            imp = await stream.reserve_import(PROMPT, PARAMS, Encoding.MODEL)
            task = asyncio.create_task(imp.run(
                busy.prefill("p1", _ask(), 30), fall_back=True,
                retries=[spare.prefill("p2", _ask(), 30)], idle_timeout_s=0.05,
                still_alive=[lambda: busy.is_alive("p1", 1)]))
            while busy.probes < 3:  # silent past three idle timeouts, alive each time
                await asyncio.sleep(0.01)
            go_on.set()
            await task
            assert imp.state is ImportState.COMMITTED and imp.failures == []
            assert spare.sent == 0 and busy.closed
            assert await _tokens(stream) == reference

    _run(tiny_llama, scenario)


def test_every_peer_at_fault_without_fallback_aborts_with_the_last_failure(
        tiny_llama: Path) -> None:
    async def scenario(d: AsyncEngine, p: AsyncEngine) -> None:
        a = ScriptedKVSource([], fail=PeerFailed("UNAVAILABLE", "refused"), fail_after=0)
        b = ScriptedKVSource(await _recorded(p), fail_after=2, stall=asyncio.Event())
        async with d.request("r") as stream:
            imp = await stream.reserve_import(PROMPT, PARAMS, Encoding.MODEL)
            with pytest.raises(PeerFailed) as e:
                await imp.run(a.prefill("p1", _ask(), 30), fall_back=False,
                              retries=[b.prefill("p2", _ask(), 30)], idle_timeout_s=0.3)
            assert e.value.code == "DEADLINE_EXCEEDED" and imp.state is ImportState.ABORTED
            assert [f.code for f in imp.failures] == ["UNAVAILABLE", "DEADLINE_EXCEEDED"]
            assert a.closed and b.closed

    _run(tiny_llama, scenario)


def test_hostile_data_is_never_retried_on_the_next_peer(tiny_llama: Path) -> None:
    async def scenario(d: AsyncEngine, p: AsyncEngine) -> None:
        bad = ScriptedKVSource(await _recorded(p), edit=_bad_crc)
        spare = ScriptedKVSource(await _recorded(p))
        async with d.request("r") as stream:
            imp = await stream.reserve_import(PROMPT, PARAMS, Encoding.MODEL)
            with pytest.raises(KVStreamError) as e:
                await imp.run(bad.prefill("p1", _ask(), 30), fall_back=True,
                              retries=[spare.prefill("p2", _ask(), 30)])
            assert e.value.code == "DATA_LOSS" and imp.state is ImportState.ABORTED
            assert spare.sent == 0 and bad.closed

    _run(tiny_llama, scenario)


def test_decode_worker_with_the_loopback_source_logs_each_step_under_the_id(
        tiny_llama: Path, reference: list[int], caplog: pytest.LogCaptureFixture) -> None:
    """The servicer's one path, REMOTE plan, KV source chosen by name; its log lines."""
    caplog.set_level(logging.INFO)
    caplog.handler.addFilter(_stamp_request_id)
    config = WorkerConfig(role="decode", engine=_config(tiny_llama), port=0,
                          kv_source="loopback")
    params = common_pb2.SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)

    async def scenario() -> None:
        d = await start_worker(config, DecodeServicer)
        try:
            async with grpc.aio.insecure_channel(d.address) as ch:
                req = worker_pb2.DecodeRequest(request_id="loop-1", prompt_token_ids=PROMPT,
                                               params=params, plan=worker_pb2.PLAN_REMOTE,
                                               prefill_address="in-process")
                msgs = [m async for m in worker_pb2_grpc.DecodeWorkerStub(ch).Generate(req)]
            assert [t for m in msgs for t in m.token_ids] == reference
            assert msgs[0].kv_bytes > 0 and msgs[-1].finish_reason == "length"
            await _settled(d.engine)
        finally:
            await d.stop(0)

    asyncio.run(scenario())
    mine = [r for r in caplog.records if getattr(r, "rid", None) == "loop-1"]
    messages = [r.getMessage() for r in mine]
    assert "admitted" in messages and "done" in messages
    admitted = mine[messages.index("admitted")]
    assert admitted.plan == "remote" and admitted.prefill == "in-process"  # type: ignore[attr-defined]
    done = mine[messages.index("done")]
    assert done.finish_reason == "length" and done.output_tokens == 10  # type: ignore[attr-defined]


def _stamp_request_id(record: logging.LogRecord) -> bool:
    record.rid = current_request_id()
    return True


def test_kv_source_is_chosen_by_a_checked_config_name() -> None:
    with pytest.raises(ValueError, match="kv_source"):
        WorkerConfig(role="decode", kv_source="carrier-pigeon")
