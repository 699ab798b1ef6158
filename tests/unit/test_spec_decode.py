"""n-gram speculative decoding in the engine, step by step. An oracle drafter (a fake:
it proposes the plain run's own continuation, right up to a chosen draft and wrong
from there) makes drafts accepted, partly accepted and all rejected on demand; the
real drafter runs on prompts that repeat themselves. Every run must give the plain
run's tokens, hold after every step exactly the blocks a plain step would, and end
with every block free and the same prefix cache as the plain run."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path

import pytest

from decode_worker.fake_kv_sources import LoopbackKVSource
from pdserve.config import EngineConfig, SpeculativeConfig
from pdserve.engine.async_engine import AsyncEngine
from pdserve.engine.engine import LLMEngine
from pdserve.engine.request import Request
from pdserve.kvwire.codec import Encoding
from pdserve.kvwire.stream import KVRequest
from pdserve.sampling_params import SamplingParams
from pdserve.worker_args import parse_args
from tests.engine_helpers import assert_engine_empty, wait_engines_empty

PROMPTS = [list(range(5, 40)) * 3, [7, 8, 9, 10] * 10 + [3, 4], list(range(100, 160))]
GREEDY = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
K = 4


class OracleDrafter:
    """Proposes what the plain run generated next, wrong from draft ``wrong_at`` on."""

    def __init__(self, continuations: dict[tuple[int, ...], list[int]], wrong_at: int) -> None:
        self.k, self.wrong_at = K, wrong_at
        self.continuations = continuations
        self.proposed = 0

    def drafts_allowed(self, num_running: int) -> bool:
        return True

    def propose(self, tokens: Sequence[int], k: int | None = None) -> list[int]:
        k = self.k if k is None else k
        for prompt, out in self.continuations.items():
            done = len(tokens) - len(prompt)
            if tuple(tokens[:len(prompt)]) == prompt and list(tokens[len(prompt):]) == out[:done]:
                self.proposed += 1
                return [t if i < self.wrong_at else (t + 1) % 256
                        for i, t in enumerate(out[done:done + k])]
        return []


def _engine(model: Path, spec: dict[str, int] | None = None, blocks: int = 64) -> LLMEngine:
    return LLMEngine(EngineConfig(model=str(model), dtype="float32", num_kv_blocks=blocks,
                                  speculative_config=spec))


def _assert_plain_holdings(e: LLMEngine) -> None:
    """What a plain step leaves every running request: blocks for its computed tokens
    (more only while a prefill is under way), full ones registered in the cache."""
    bs = e.blocks.block_size
    for r in e.scheduler.running:
        if r.num_tokens - r.num_computed_tokens == 1:
            assert len(r.block_ids) == e.blocks.blocks_for_tokens(r.num_computed_tokens), r
            assert r.num_registered_blocks == r.num_computed_tokens // bs


def _run(e: LLMEngine, params: SamplingParams = GREEDY,
         prompts: list[list[int]] = PROMPTS) -> dict[str, list[int]]:
    for i, p in enumerate(prompts):
        e.add_request(f"r{i}", p, params)
    done: dict[str, list[int]] = {}
    while e.has_unfinished_requests:
        for out in e.step():
            if out.finished:
                done[out.request_id] = out.token_ids
        _assert_plain_holdings(e)
    return done


@pytest.fixture(scope="module")
def plain(tiny_llama: Path) -> tuple[dict[str, list[int]], list[int]]:
    e = _engine(tiny_llama)
    out = _run(e)
    return out, sorted(e.blocks.cached_hashes())


@pytest.mark.parametrize("wrong_at,accepted", [(K, "all"), (2, "part"), (0, "none")])
def test_drafts_accepted_partly_or_not_give_the_plain_tokens_and_blocks(
        tiny_llama: Path, plain: tuple[dict[str, list[int]], list[int]], wrong_at: int,
        accepted: str) -> None:
    want, cached = plain
    e = _engine(tiny_llama)
    oracle = OracleDrafter({tuple(p): want[f"r{i}"] for i, p in enumerate(PROMPTS)}, wrong_at)
    e.scheduler.drafter = oracle  # type: ignore[assignment]
    assert _run(e) == want
    s = e.scheduler
    assert oracle.proposed == s.spec_drafts > 0
    assert s.spec_accepted_tokens == {"all": s.spec_draft_tokens, "none": 0,
                                      "part": 2 * s.spec_drafts}[accepted]
    if accepted == "all":  # every step but the first of each request took K + 1 tokens
        assert s.spec_drafts <= 3 * -(-39 // (K + 1)) + 3
    assert_engine_empty(e)
    assert sorted(e.blocks.cached_hashes()) == cached


def test_the_ngram_drafter_on_self_repeating_text(tiny_llama: Path) -> None:
    # A random model's greedy output soon loops: its own n-grams recur, drafts follow.
    e = _engine(tiny_llama, {"num_speculative_tokens": K, "prompt_lookup_min": 2,
                             "prompt_lookup_max": 4})
    long = SamplingParams(temperature=0, max_tokens=120, ignore_eos=True)
    got = _run(e, long)
    assert got == _run(_engine(tiny_llama), long)
    counters = e.scheduler.counters()
    assert counters["spec_decode_num_drafts"] > 0
    assert 0 < counters["spec_decode_num_accepted_tokens"] <= \
        counters["spec_decode_num_draft_tokens"]
    assert_engine_empty(e)


def test_a_stop_inside_accepted_drafts_ends_the_request_where_plain_would(
        tiny_llama: Path, plain: tuple[dict[str, list[int]], list[int]]) -> None:
    want, _ = plain
    stop_at = want["r0"][12]
    params = SamplingParams(temperature=0, max_tokens=40, stop_token_ids=[stop_at])
    ref = _run(_engine(tiny_llama), params)
    e = _engine(tiny_llama)
    e.scheduler.drafter = OracleDrafter(  # type: ignore[assignment]
        {tuple(p): want[f"r{i}"] for i, p in enumerate(PROMPTS)}, K)
    assert _run(e, params) == ref
    assert ref["r0"][-1] == stop_at and len(ref["r0"]) <= 13
    assert_engine_empty(e)


def test_sampling_requests_are_not_speculated(tiny_llama: Path) -> None:
    seeded = SamplingParams(temperature=0.8, seed=7, max_tokens=30, ignore_eos=True)
    e = _engine(tiny_llama, {"num_speculative_tokens": K, "prompt_lookup_min": 1})
    assert _run(e, seeded) == _run(_engine(tiny_llama), seeded)
    assert e.scheduler.spec_drafts == 0
    assert_engine_empty(e)


def test_preemption_with_drafts_in_flight_loses_nothing(
        tiny_llama: Path, plain: tuple[dict[str, list[int]], list[int]]) -> None:
    want, _ = plain
    e = _engine(tiny_llama, blocks=14)  # 3 requests of up to 160 tokens: they take turns
    e.scheduler.drafter = OracleDrafter(  # type: ignore[assignment]
        {tuple(p): want[f"r{i}"] for i, p in enumerate(PROMPTS)}, 3)
    preempted: list[Request] = []
    original = e.scheduler._preempt

    def spy(req: Request) -> None:
        preempted.append(req)
        original(req)

    e.scheduler._preempt = spy  # type: ignore[method-assign]
    assert _run(e) == want
    assert preempted and e.scheduler.spec_accepted_tokens > 0
    assert_engine_empty(e)


def test_after_a_kv_import_the_decode_engine_speculates_the_same_tokens(
        tiny_llama: Path, plain: tuple[dict[str, list[int]], list[int]]) -> None:
    want, _ = plain
    prompt = PROMPTS[0]

    async def main() -> list[int]:
        d, p = AsyncEngine(_engine(tiny_llama)), AsyncEngine(_engine(tiny_llama))
        oracle = OracleDrafter({tuple(prompt): want["r0"]}, K)
        d.engine.scheduler.drafter = oracle  # type: ignore[assignment]
        d.start()
        p.start()
        try:
            tokens: list[int] = []
            async with d.request("r0") as stream:
                imp = await stream.reserve_import(prompt, GREEDY, Encoding.MODEL)
                ask = KVRequest("r0", prompt, GREEDY, Encoding.MODEL)
                await imp.run(LoopbackKVSource(p).prefill("p", ask, 30), fall_back=False)
                async for out in stream.outputs():
                    tokens += out.new_token_ids
            await wait_engines_empty(d.engine, p.engine)
            assert d.engine.scheduler.spec_accepted_tokens > 0
            return tokens
        finally:
            d.stop()
            p.stop()

    assert asyncio.run(main()) == want["r0"]


@pytest.mark.parametrize("value,says", [
    ("{", "not JSON"), ('{"num_speculative_tokens": 0}', "num_speculative_tokens"),
    ('{"method": "eagle", "num_speculative_tokens": 2}', "method"), ("[4]", "a mapping"),
    ('{"num_speculative_tokens": 2, "lookahead": 1}', "keys among")])
def test_a_bad_speculative_config_flag_exits_2_naming_the_problem(
        value: str, says: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        parse_args("decode", ["--speculative-config", value])
    assert e.value.code == 2 and says in capsys.readouterr().err
    spec = parse_args("decode", ["--speculative-config", '{"num_speculative_tokens": 3}'])
    assert spec.engine.speculative_config == SpeculativeConfig(3, "ngram", 5, 5)  # vLLM's 5/5


def test_disable_by_batch_size_drafts_only_while_the_batch_is_small(tiny_llama: Path) -> None:
    spec = {"num_speculative_tokens": K, "prompt_lookup_min": 2, "prompt_lookup_max": 4,
            "disable_by_batch_size": 1}
    long = SamplingParams(temperature=0, max_tokens=120, ignore_eos=True)
    batch = _engine(tiny_llama, spec)
    assert _run(batch, long) == _run(_engine(tiny_llama), long)
    assert batch.scheduler.spec_drafts == 0  # three running all along
    alone = _engine(tiny_llama, spec)
    _run(alone, long, PROMPTS[:1])
    assert alone.scheduler.spec_drafts > 0
    assert_engine_empty(batch)
    assert_engine_empty(alone)
