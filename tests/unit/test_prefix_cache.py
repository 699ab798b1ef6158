"""Prefix caching, step by step: blocks kept after their request, found again by hash,
shared, evicted only when the pool needs them; the engine's tokens unchanged by it;
a KV import that skips what the decode side already holds."""

from __future__ import annotations

from pathlib import Path

import pytest

from pdserve.config import EngineConfig
from pdserve.engine.block_manager import BlockManager
from pdserve.engine.engine import LLMEngine
from pdserve.kvwire.codec import Encoding
from pdserve.prefix_hash import prefix_hashes, salt_hash
from pdserve.sampling_params import SamplingParams
from tests.engine_helpers import assert_engine_empty, run_all
from tests.unit.test_kv_transfer import ListExporter

SALT = salt_hash("test")
GREEDY = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)


def _engine(model: Path, blocks: int = 64, caching: bool = True) -> LLMEngine:
    return LLMEngine(EngineConfig(model=str(model), dtype="float32", num_kv_blocks=blocks,
                                  max_num_batched_tokens=32, enable_prefix_caching=caching))


def _tokens(engine: LLMEngine, rid: str, prompt: list[int]) -> list[int]:
    engine.add_request(rid, prompt, GREEDY)
    return run_all(engine)[rid].token_ids


def test_hash_chain_names_the_whole_prefix() -> None:
    a = prefix_hashes(list(range(40)), 16, SALT)
    assert len(a) == 2  # full blocks only
    b = prefix_hashes([99, *range(1, 40)], 16, SALT)
    assert a[0] != b[0] and a[1] != b[1]  # same second block, different prefix
    assert prefix_hashes(list(range(40)), 16, salt_hash("other")) != a
    assert prefix_hashes(list(range(40)), 16, SALT) == a  # stable


def test_freed_blocks_stay_cached_until_the_pool_needs_them() -> None:
    bm = BlockManager(num_blocks=4, block_size=16)
    h = prefix_hashes(list(range(32)), 16, SALT)
    a = bm.allocate(3)
    bm.register(a[0], h[0])
    bm.register(a[1], h[1])
    bm.free(a)
    # STEP 1: all free, two of them CACHED and found again.
    assert bm.all_free() and bm.num_cached_blocks == 2
    assert bm.match_prefix(h) == a[:2]
    # STEP 2: a hit takes them back in use; sharing counts references.
    bm.take_cached(a[:2])
    assert bm.num_free_blocks == 2 and bm.num_reclaimed(a[:2]) == 0
    bm.share(a[:1])
    bm.free(a[:2])
    bm.free(a[:1])
    # STEP 3: empty blocks go first; then the least recently freed cached block.
    got = bm.allocate(2)
    assert set(got).isdisjoint(a[:2]) and bm.num_cached_blocks == 2
    evicted = bm.allocate(1)
    assert evicted == [a[1]]  # freed before a[0] (reversed free order)
    assert bm.match_prefix(h) == [a[0]] and bm.num_cached_blocks == 1
    bm.free(got + evicted)
    assert bm.all_free()


def test_a_hash_held_twice_registers_once_and_caching_off_finds_nothing() -> None:
    bm = BlockManager(num_blocks=4, block_size=16)
    h = prefix_hashes(list(range(16)), 16, SALT)[0]
    a, b = bm.allocate(1), bm.allocate(1)
    bm.register(a[0], h)
    bm.register(b[0], h)  # computed twice at once: the second stays unregistered
    bm.free(a + b)
    assert bm.num_cached_blocks == 1 and bm.all_free()
    off = BlockManager(num_blocks=4, block_size=16, enable_caching=False)
    c = off.allocate(1)
    off.register(c[0], h)
    off.free(c)
    assert off.match_prefix([h]) == [] and off.num_cached_blocks == 0


def test_second_request_reuses_the_prefix_and_gets_the_same_tokens(tiny_llama: Path) -> None:
    plain = _engine(tiny_llama, caching=False)
    prompt = list(range(5, 75))  # 70 tokens: 4 full blocks can be reused
    reference = _tokens(plain, "ref", prompt)
    assert plain.scheduler.prefix_hits == 0

    e = _engine(tiny_llama)
    assert _tokens(e, "a", prompt) == reference
    assert (e.scheduler.prefix_queries, e.scheduler.prefix_hits) == (70, 0)
    assert _tokens(e, "b", prompt) == reference
    assert (e.scheduler.prefix_queries, e.scheduler.prefix_hits) == (140, 64)
    # A longer prompt sharing the first 64 tokens: those come from the cache.
    longer = [*prompt[:64], *range(200, 230)]
    e.add_request("c", longer, GREEDY)
    assert run_all(e)["c"].num_cached_tokens == 64
    assert e.scheduler.prefix_hits == 128
    assert_engine_empty(e)


def test_running_requests_share_blocks_and_eviction_keeps_tokens_right(
        tiny_llama: Path) -> None:
    plain = _engine(tiny_llama, caching=False)
    prompts = {f"r{i}": [*range(5, 53), *range(100 + 20 * i, 110 + 20 * i)] for i in range(4)}
    reference = {rid: _tokens(plain, rid, p) for rid, p in prompts.items()}

    e = _engine(tiny_llama, blocks=12)  # short: later requests evict cached blocks
    for rid, p in prompts.items():
        e.add_request(rid, p, GREEDY)
    e.step()  # r0 admitted first; the others wait for the budget
    done = run_all(e)
    assert {rid: out.token_ids for rid, out in done.items()} == reference
    assert e.scheduler.prefix_hits >= 48  # r1.. found r0's 3 shared blocks
    assert_engine_empty(e)
    # Every block is free again; a fresh request still computes correct tokens.
    assert _tokens(e, "again", prompts["r0"]) == reference["r0"]


def test_import_skips_the_cached_prefix(tiny_llama: Path) -> None:
    prompt = list(range(5, 75))
    a, b = _engine(tiny_llama), _engine(tiny_llama)
    reference = _tokens(a, "ref", prompt)
    _tokens(b, "earlier", [*prompt[:40], 9, 9, 9])  # b holds the first 2 blocks

    cached = b.begin_import("d", prompt, GREEDY)
    assert cached == 32
    with pytest.raises(ValueError, match="uncached part"):  # shared blocks are read-only
        b.write_kv("d", 0, 16, *_zeros(b, 4))

    # A sends only what b lacks: every layer's rows start at 32.
    exporter = ListExporter()
    a.add_request("p", prompt, SamplingParams(temperature=0, max_tokens=1, ignore_eos=True),
                  kv_exporter=exporter)
    first = run_all(a)["p"].token_ids
    for layer, start, k, v in exporter.chunks:
        if start + k.shape[0] > cached:
            skip = max(cached - start, 0)
            b.write_kv("d", layer, start + skip, k[skip:], v[skip:])
    b.commit_import("d", first[0])
    assert run_all(b)["d"].token_ids == reference
    assert_engine_empty(b)


def test_lossy_wire_kv_is_cached_apart_from_computed_kv(tiny_llama: Path) -> None:
    e = _engine(tiny_llama)
    prompt = list(range(5, 75))
    _tokens(e, "local", prompt)
    assert e.begin_import("exact", prompt, GREEDY, Encoding.FP32) == 64
    assert e.abort("exact")
    # int8 on the wire is not what this engine computes: no hit on computed blocks.
    assert e.begin_import("int8", prompt, GREEDY, Encoding.INT8) == 0
    assert e.abort("int8")
    run_all(e)
    assert_engine_empty(e)


def _zeros(engine: LLMEngine, n: int) -> tuple[object, object]:
    import torch

    s = engine.spec
    z = torch.zeros(n, s.num_kv_heads, s.head_dim)
    return z, z


def test_abort_and_preemption_with_shared_blocks_leave_the_sharer_right(
        tiny_llama: Path) -> None:
    plain = _engine(tiny_llama, caching=False)
    shared = list(range(5, 69))  # 4 full blocks both requests share
    prompts = {"keep": [*shared, 70, 71, 72], "drop": [*shared, 80, 81, 82]}
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    plain.add_request("keep", prompts["keep"], params)
    reference = run_all(plain)["keep"].token_ids

    # STEP 1: "drop" fills the cache, then "keep" shares its 4 blocks.
    e = _engine(tiny_llama, blocks=9)  # 4 shared + 3 + 3 at the end: one block short
    e.add_request("drop", prompts["drop"], params)
    for _ in range(4):
        e.step()
    e.add_request("keep", prompts["keep"], params)
    e.step()
    keep, drop = e.requests["keep"], e.requests["drop"]
    assert keep.num_cached_tokens == 64 and keep.block_ids[:4] == drop.block_ids[:4]
    # STEP 2: both grow until the pool is short: the newest ("keep") is preempted, its
    # shared blocks stay referenced by "drop"; then "drop" is aborted.
    for _ in range(80):
        if keep.metrics.num_preemptions:
            break
        e.step()
    assert keep.metrics.num_preemptions == 1 and not drop.is_finished
    assert e.abort("drop")
    # STEP 3: "keep" comes back, finds its prefix (and its own output) cached, and
    # ends with the tokens it gets alone.
    assert run_all(e)["keep"].token_ids == reference
    assert_engine_empty(e)
