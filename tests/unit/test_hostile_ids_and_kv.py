"""Issue 15, item 1: nothing from a client or a peer reaches the engine unchecked.

Finding 1: token ids outside the vocabulary (stop_token_ids, a prefill peer's first
token) are refused at the engine's boundary and at every servicer, with a clear
status; the engine keeps serving correct tokens.
Finding 2: KV that is not finite is refused (DATA_LOSS), and stale NaN left in a
reused block by its previous owner never reaches a later request's output.
Every test ends with every block free and every queue empty.
"""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

import grpc
import pytest
import torch

from decode_worker.fake_kv_sources import LoopbackKVSource, ScriptedKVSource
from decode_worker.servicer import DecodeServicer
from pdserve._proto.pdserve.v1 import common_pb2, worker_pb2, worker_pb2_grpc
from pdserve.config import EngineConfig, WorkerConfig
from pdserve.engine.async_engine import AsyncEngine
from pdserve.engine.engine import LLMEngine
from pdserve.engine.kv_import import ImportState
from pdserve.kvwire.codec import Encoding, encode
from pdserve.kvwire.stream import FirstToken, KVChunk, KVEvent, KVRequest, KVStreamError
from pdserve.logprobs import Logprob
from pdserve.sampling_params import SamplingParams
from pdserve.worker_host import RunningWorker, start_worker
from prefill_worker.servicer import PrefillServicer
from tests.engine_helpers import (
    assert_engine_empty,
    run_all,
    wait_engines_empty,
    wait_streams_closed,
)

PROMPT = list(range(5, 75))  # 70 tokens
PARAMS = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)


def _config(model: Path, kernels: str = "auto") -> EngineConfig:
    return EngineConfig(model=str(model), dtype="float32", num_kv_blocks=64,
                        max_num_batched_tokens=32, kernels=kernels)


@pytest.fixture(scope="module")
def engine(tiny_llama: Path) -> LLMEngine:
    return LLMEngine(_config(tiny_llama))


@pytest.fixture(scope="module")
def reference(engine: LLMEngine) -> list[int]:
    engine.add_request("ref", PROMPT, PARAMS)
    return run_all(engine)["ref"].token_ids  # type: ignore[attr-defined]


# --- finding 1: token ids --------------------------------------------------------------

def test_finding1_stop_token_id_outside_vocab_fails_alone(engine: LLMEngine,
                                                          reference: list[int]) -> None:
    vocab = engine.spec.vocab_size
    engine.add_request("good", PROMPT, PARAMS)
    engine.step()
    for i, bad in enumerate((vocab, 10**9)):
        hostile = SamplingParams(max_tokens=4, min_tokens=1, stop_token_ids=(3, bad))
        with pytest.raises(ValueError, match=r"stop_token_ids must be in \[0, "):
            engine.add_request(f"bad-{i}", PROMPT, hostile)
    with pytest.raises(ValueError, match="stop_token_ids must be integers >= 0"):
        SamplingParams(stop_token_ids=(-1,))  # before any engine sees it
    done = run_all(engine)
    assert done["good"].token_ids == reference  # type: ignore[attr-defined]
    assert set(done) == {"good"}
    assert_engine_empty(engine)


def test_finding1_commit_refuses_a_first_token_outside_vocab(engine: LLMEngine,
                                                             reference: list[int]) -> None:
    vocab = engine.spec.vocab_size
    engine.begin_import("imp", PROMPT, PARAMS)
    for bad, lp in ((vocab, None), (3, Logprob(3, -0.1, [(vocab + 5, -1.0)]))):
        with pytest.raises(ValueError, match="first token"):
            engine.commit_import("imp", bad, lp)
    engine.abort("imp")
    engine.add_request("after", PROMPT, PARAMS)
    assert run_all(engine)["after"].token_ids == reference  # type: ignore[attr-defined]
    assert_engine_empty(engine)


def _run(model: Path, scenario) -> None:  # type: ignore[no-untyped-def]
    async def main() -> None:
        d, p = AsyncEngine(LLMEngine(_config(model))), AsyncEngine(LLMEngine(_config(model)))
        d.start()
        p.start()
        try:
            await scenario(d, p)
            await wait_engines_empty(d.engine, p.engine)
            await wait_streams_closed(d, p)
        finally:
            d.stop()
            p.stop()

    asyncio.run(main())


def _ask(rid: str) -> KVRequest:
    return KVRequest(rid, PROMPT, PARAMS, Encoding.MODEL)


async def _tokens(stream) -> list[int]:  # type: ignore[no-untyped-def]
    return [t async for out in stream.outputs() for t in out.new_token_ids]


def _first_token(token_id: int):  # type: ignore[no-untyped-def]
    def edit(events: list[KVEvent]) -> list[KVEvent]:
        last = events[-1]
        assert isinstance(last, FirstToken)
        return [*events[:-1], dataclasses.replace(last, token=Logprob(token_id, 0.0, []))]
    return edit


def _nan_chunk(events: list[KVEvent]) -> list[KVEvent]:
    """A chunk full of NaN whose CRC is right: the sender meant it."""
    i = next(i for i, e in enumerate(events) if isinstance(e, KVChunk))
    c = events[i]
    assert isinstance(c, KVChunk)
    n = len(c.payload.k) // 4 // c.num_tokens  # kv_heads * head_dim, fp32
    nan = torch.full((c.num_tokens, 1, n), float("nan"))
    payload = encode(nan, nan, Encoding.FP32)
    events[i] = dataclasses.replace(c, encoding=Encoding.FP32, payload=payload,
                                    crc32c=payload.crc32c())
    return events


@pytest.mark.parametrize(("edit", "code"), [
    pytest.param("first_token_vocab", "INVALID_ARGUMENT", id="finding1-first-token-vocab"),
    pytest.param("first_token_huge", "INVALID_ARGUMENT", id="finding1-first-token-huge"),
    pytest.param("nan_kv", "DATA_LOSS", id="finding2-nan-kv"),
])
def test_hostile_peer_fails_its_request_and_the_next_one_is_correct(
        tiny_llama: Path, reference: list[int], edit: str, code: str) -> None:
    async def scenario(d: AsyncEngine, p: AsyncEngine) -> None:
        vocab = d.engine.spec.vocab_size
        edits = {"first_token_vocab": _first_token(vocab),
                 "first_token_huge": _first_token(2**32 - 1), "nan_kv": _nan_chunk}
        recorded = await LoopbackKVSource(p).record(_ask("rec"))
        src = ScriptedKVSource(recorded, edit=edits[edit])
        async with d.request("bad") as stream:
            imp = await stream.reserve_import(PROMPT, PARAMS, Encoding.MODEL)
            with pytest.raises(KVStreamError) as e:
                await imp.run(src.prefill("p", _ask("bad"), 30), fall_back=True)
            assert e.value.code == code, str(e.value)
            assert imp.state is ImportState.ABORTED
        async with d.request("next") as stream:  # the worker keeps serving correct tokens
            imp = await stream.reserve_import(PROMPT, PARAMS, Encoding.MODEL)
            await imp.run(LoopbackKVSource(p).prefill("p", _ask("next"), 30), fall_back=False)
            assert await _tokens(stream) == reference

    _run(tiny_llama, scenario)


def _worker_config(model: Path, role: str) -> WorkerConfig:
    return WorkerConfig(role=role, engine=_config(model), port=0)


async def _settled(w: RunningWorker) -> None:
    await wait_engines_empty(w.engine.engine)


def test_finding1_workers_answer_invalid_argument_for_stop_ids_outside_vocab(
        tiny_llama: Path, reference: list[int]) -> None:
    """A decode worker (local and remote plans) and a prefill worker refuse the request;
    the engine thread lives on and the next request gets the right tokens."""
    async def scenario() -> None:
        p = await start_worker(_worker_config(tiny_llama, "prefill"), PrefillServicer)
        d = await start_worker(_worker_config(tiny_llama, "decode"), DecodeServicer)
        vocab = d.engine.engine.spec.vocab_size
        bad = common_pb2.SamplingParams(max_tokens=8, min_tokens=1, stop_token_ids=[vocab])
        good = common_pb2.SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
        try:
            async with grpc.aio.insecure_channel(d.address) as dch, \
                    grpc.aio.insecure_channel(p.address) as pch:
                decode = worker_pb2_grpc.DecodeWorkerStub(dch)
                prefill = worker_pb2_grpc.PrefillWorkerStub(pch)
                for i, addr in enumerate(("", p.address)):
                    req = worker_pb2.DecodeRequest(request_id=f"d{i}", prompt_token_ids=PROMPT,
                                                   params=bad, prefill_address=addr)
                    with pytest.raises(grpc.aio.AioRpcError) as e:
                        _ = [m async for m in decode.Generate(req, timeout=30)]
                    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                    assert "stop_token_ids" in (e.value.details() or "")
                preq = worker_pb2.PrefillRequest(request_id="p0", prompt_token_ids=PROMPT,
                                                 params=bad)
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    _ = [m async for m in prefill.Prefill(preq, timeout=30)]
                assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                ok = worker_pb2.DecodeRequest(request_id="ok", prompt_token_ids=PROMPT,
                                              params=good, prefill_address=p.address)
                tokens = [t async for m in decode.Generate(ok, timeout=30) for t in m.token_ids]
                assert tokens == reference
            await _settled(d)
            await _settled(p)
        finally:
            await d.stop(0)
            await p.stop(0)

    asyncio.run(scenario())


# --- finding 2: stale values in reused blocks ------------------------------------------

@pytest.mark.parametrize("kernels", ["torch", "cpu"])
def test_finding2_stale_nan_in_reused_blocks_never_reaches_attention(
        tiny_llama: Path, kernels: str) -> None:
    """Freed blocks full of NaN (a previous owner's leftovers) are reallocated to new
    requests: their output is a clean run's, on the torch path and the native kernels."""
    try:
        engines = [LLMEngine(_config(tiny_llama, kernels)) for _ in range(2)]
    except (RuntimeError, ValueError) as e:  # no compiler / kernels for this CPU
        pytest.skip(f"kernels={kernels} unavailable: {e}")
    stale, clean = engines
    stale.kv.data.fill_(float("nan"))  # every block free, every slot stale NaN
    outputs = []
    for e in engines:
        e.add_request("a", PROMPT, PARAMS)
        e.add_request("b", PROMPT[:33], dataclasses.replace(PARAMS, max_tokens=20))
        done = run_all(e)
        outputs.append({rid: out.token_ids for rid, out in done.items()})  # type: ignore[attr-defined]
        assert_engine_empty(e)
    assert outputs[0] == outputs[1]
