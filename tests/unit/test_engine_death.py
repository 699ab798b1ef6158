"""An engine whose step raises is DEAD: ``on_death`` runs first, then every open
stream and pending call fails with EngineDeadError("engine died: …"), later calls
fail at once, and nothing hangs (tiny model, in process)."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest

from pdserve.config import EngineConfig
from pdserve.engine.async_engine import AsyncEngine, EngineDeadError
from pdserve.engine.engine import LLMEngine
from pdserve.sampling_params import SamplingParams
from tests.faulting_engine import FaultingRunner

PARAMS = SamplingParams(max_tokens=50, temperature=0, ignore_eos=True)


def _engine(tiny_llama: Path, steps_ok: int) -> LLMEngine:
    llm = LLMEngine(EngineConfig(model=str(tiny_llama), dtype="float32", num_kv_blocks=32))
    FaultingRunner.install(llm, steps_ok)
    return llm


async def _read_all(engine: AsyncEngine, rid: str) -> int:
    n = 0
    async with engine.request(rid) as stream:
        await stream.add(list(range(5, 15)), PARAMS)
        async for _ in stream.outputs():
            n += 1
    return n


def test_death_fails_open_streams_after_the_hook_and_later_calls_at_once(
        tiny_llama: Path) -> None:
    events: list[str] = []

    async def on_death(e: BaseException) -> None:
        events.append(f"hook: {e}")

    async def scenario() -> None:
        engine = AsyncEngine(_engine(tiny_llama, steps_ok=3), on_death)
        engine.start()
        try:
            results = await asyncio.wait_for(asyncio.gather(
                *(_read_all(engine, f"r{i}") for i in range(3)), return_exceptions=True), 30)
            for r in results:
                assert isinstance(r, EngineDeadError), r
                assert str(r) == "engine died: RuntimeError: injected fault in step 4"
                events.append("stream failed")
            assert events[0] == "hook: injected fault in step 4"
            assert isinstance(await asyncio.wait_for(engine.wait_dead(), 5), RuntimeError)
            with pytest.raises(EngineDeadError, match="engine died"):
                async with engine.request("after"):
                    pass
            with pytest.raises(EngineDeadError):
                await asyncio.wait_for(engine.call(lambda: 1), 5)
            engine.abort("r0")  # a no-op, not an error
            assert engine.open_requests == []
        finally:
            engine.stop()

    asyncio.run(scenario())


def test_a_call_queued_when_the_engine_dies_fails_instead_of_hanging(tiny_llama: Path) -> None:
    gate = threading.Event()
    llm = LLMEngine(EngineConfig(model=str(tiny_llama), dtype="float32", num_kv_blocks=32))
    runner = FaultingRunner.install(llm, 0, gate)

    async def scenario() -> None:
        engine = AsyncEngine(llm)
        engine.start()
        try:
            async with engine.request("r") as stream:
                await stream.add(list(range(5, 15)), PARAMS)
                assert await asyncio.to_thread(runner.entered.wait, 30)
                # Queued behind the failing step: never run, so it must be failed.
                pending = asyncio.ensure_future(engine.call(lambda: 1))
                await asyncio.sleep(0)  # the call is queued
                gate.set()
                with pytest.raises(EngineDeadError):
                    async for _ in stream.outputs():
                        pass
            with pytest.raises(EngineDeadError):
                await asyncio.wait_for(pending, 5)
        finally:
            engine.stop()

    asyncio.run(scenario())
