"""The cost-model policy's choices from worker states (fakes, then real workers over
gRPC): prefix affinity, local prefill when the prefill worker is busy, remote when the
decode worker is, the fallback without live state, and a worker that stops answering."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from pathlib import Path

import pytest

from decode_worker.servicer import DecodeServicer
from pdserve._proto.pdserve.v1 import worker_pb2
from pdserve.config import EngineConfig, WorkerConfig
from pdserve.prefix_hash import prefix_hashes, salt_hash
from pdserve.sampling_params import SamplingParams
from pdserve.worker_host import start_worker
from pdserve.worker_state import WorkerLoad, short_hash
from router.cost_model import CostModelPolicy
from router.decode_client import DecodeClients, _load_from_pb
from router.worker_loads import WorkerLoads
from tests.router_fakes import FakeDecodeBackend, FakeDecodeWorker, nothing_in_flight

SALT = salt_hash("m")
IDLE = WorkerLoad("decode", 0, 0, 0, 100, 100, 16, prefill_tokens_per_s=1000.0,
                  decode_step_s=0.03, prefix_salt=SALT, decode_step_budget_s=0.1,
                  kv_bytes_per_token=1000.0)
PREFILL = replace(IDLE, role="prefill", decode_step_budget_s=0.0)
PROMPT = list(range(1, 513))  # 512 tokens: 0.512 s at 1,000 tokens/s


def _holding(load: WorkerLoad, tokens: list[int]) -> WorkerLoad:
    hashes = prefix_hashes(tokens[:-1], 16, SALT)
    return replace(load, cached_blocks=frozenset(short_hash(h) for h in hashes))


def _policy(states: dict[str, WorkerLoad], decode: tuple[str, ...] = ("d:1", "d:2"),
            prefill: tuple[str, ...] = ("p:1",)) -> CostModelPolicy:
    return CostModelPolicy(decode, prefill, 16, states.get, stall_budget_s=0.1)


def test_the_second_turn_goes_where_its_prefix_is() -> None:
    turn2 = [*PROMPT, *range(600, 700)]
    policy = _policy({"d:1": IDLE, "d:2": _holding(IDLE, PROMPT), "p:1": PREFILL})
    for _ in range(3):  # whatever the rotation says
        choice = policy.choose(turn2)
        assert choice is not None and choice.decode.address == "d:2"
        assert choice.plan == "local"  # 116 uncached tokens on an idle worker
        assert choice.predicted_ttft_s == pytest.approx((612 - 496) / 1000)


def test_among_near_ties_the_worker_holding_the_prefix_wins_over_a_less_loaded_one() -> None:
    # The prefill worker caches the prompt too: remote to d:1 predicts as fast as local
    # on d:2 (16 uncached tokens either way), but only d:2 keeps the conversation's cache.
    policy = _policy({"d:1": IDLE, "d:2": _holding(IDLE, PROMPT),
                      "p:1": _holding(PREFILL, PROMPT)})
    policy.decode[1].in_flight_tokens = 1000  # d:2 has more in flight
    for _ in range(2):
        choice = policy.choose(PROMPT)
        assert choice is not None and choice.decode.address == "d:2"
    policy.decode[1].in_flight_tokens = 0
    assert nothing_in_flight(policy)


def test_a_busy_prefill_worker_sends_prompts_local_and_an_idle_one_takes_them() -> None:
    decoding = replace(IDLE, num_running=8)  # local: 1000 * (1 - 0.03/0.1) = 700 tok/s
    idle_p = _policy({"d:1": decoding, "p:1": PREFILL}, ("d:1",))
    choice = idle_p.choose(PROMPT)
    assert choice is not None and choice.plan == "remote"
    assert choice.predicted_ttft_s == pytest.approx(0.512)
    busy = replace(PREFILL, pending_prefill_tokens=4096)  # 4 s of queue
    choice = _policy({"d:1": decoding, "p:1": busy}, ("d:1",)).choose(PROMPT)
    assert choice is not None and choice.plan == "local"
    assert choice.predicted_ttft_s == pytest.approx(512 / 700)


def test_without_a_step_budget_a_long_local_stall_is_not_allowed() -> None:
    unbudgeted = replace(IDLE, num_running=4, decode_step_budget_s=0.0)
    busy = replace(PREFILL, pending_prefill_tokens=4096)
    choice = _policy({"d:1": unbudgeted, "p:1": busy}, ("d:1",)).choose(PROMPT)
    assert choice is not None and choice.plan == "remote"  # 0.5 s stall > 0.1 s budget
    short = _policy({"d:1": unbudgeted, "p:1": busy}, ("d:1",)).choose(PROMPT[:64])
    assert short is not None and short.plan == "local"  # 64 ms: within the budget


def test_the_prefill_worker_with_the_prefix_or_the_shorter_queue_wins() -> None:
    states = {"d:1": replace(IDLE, num_running=8), "p:1": replace(PREFILL, pending_prefill_tokens=2048),
              "p:2": PREFILL}
    choice = _policy(states, ("d:1",), ("p:1", "p:2")).choose(PROMPT)
    assert choice is not None and choice.prefill is not None
    assert choice.prefill.address == "p:2" and choice.prefill_fallbacks == ("p:1",)
    states["p:1"] = _holding(PREFILL, PROMPT)
    choice = _policy(states, ("d:1",), ("p:1", "p:2")).choose(PROMPT)
    assert choice is not None and choice.prefill is not None and choice.prefill.address == "p:1"


def test_the_transfer_counts_when_the_link_is_slow() -> None:
    slow = replace(IDLE, num_running=8, kv_link_bytes_per_s=100_000.0)  # 5 s for 512 tokens
    choice = _policy({"d:1": slow, "p:1": PREFILL}, ("d:1",)).choose(PROMPT)
    assert choice is not None and choice.plan == "local"


INT8 = 4  # KVEncoding value
# A decode worker that may not prefill (no step budget, requests running) behind a
# 100 kB/s link: every plan is remote, 512 tokens of default-encoded KV take 5.12 s.
BEHIND_SLOW_LINK = replace(IDLE, num_running=8, decode_step_budget_s=0.0,
                           kv_link_bytes_per_s=100_000.0,
                           kv_bytes_per_token_by_encoding={INT8: 500.0, 2: 1000.0})


def test_a_slow_link_moves_the_kv_to_int8_where_allowed() -> None:
    states = {"d:1": BEHIND_SLOW_LINK, "p:1": PREFILL}
    default = _policy(states, ("d:1",)).choose(PROMPT)
    assert default is not None and default.plan == "remote" and default.kv_encoding == 0
    assert default.predicted_ttft_s == pytest.approx(5.12)
    policy = CostModelPolicy(("d:1",), ("p:1",), 16, states.get, 0.1, kv_encodings=(INT8,))
    choice = policy.choose(PROMPT)
    assert choice is not None and choice.kv_encoding == INT8
    assert choice.predicted_ttft_s == pytest.approx(2.56)  # half the bytes
    states["d:1"] = replace(BEHIND_SLOW_LINK, kv_link_bytes_per_s=10_000_000.0)
    fast = policy.choose(PROMPT)  # compute-bound either way: the lossless default
    assert fast is not None and fast.kv_encoding == 0
    assert fast.predicted_ttft_s == pytest.approx(0.512)


def test_the_link_backlog_delays_the_transfer_but_not_past_the_prefill_queue() -> None:
    backlog = replace(BEHIND_SLOW_LINK, kv_link_bytes_per_s=1_000_000.0,  # 0.512 s of KV
                      kv_pending_bytes=2_000_000)  # 2 s of imports still to arrive
    choice = _policy({"d:1": backlog, "p:1": PREFILL}, ("d:1",)).choose(PROMPT)
    assert choice is not None and choice.predicted_ttft_s == pytest.approx(2.512)
    queued = replace(PREFILL, pending_prefill_tokens=3000)  # 3 s: the link is free by then
    choice = _policy({"d:1": backlog, "p:1": queued}, ("d:1",)).choose(PROMPT)
    assert choice is not None and choice.predicted_ttft_s == pytest.approx(3.512)


def test_without_live_state_the_policy_is_load_aware_and_accounts_the_same() -> None:
    policy = _policy({})
    choice = policy.choose(PROMPT)
    assert choice is not None and choice.plan == "remote" and choice.predicted_ttft_s is None
    policy.dispatched("a", choice, len(PROMPT))
    policy.ended("a")
    assert nothing_in_flight(policy)
    assert _policy({}).choose(PROMPT[:8]).plan == "local"  # type: ignore[union-attr]


def test_a_worker_that_stops_answering_goes_stale_and_comes_back() -> None:
    now = [0.0]
    worker = FakeDecodeWorker("d:1", state=IDLE)
    loads = WorkerLoads(FakeDecodeBackend([worker]), ["d:1"], [], max_age_s=2.0,
                        clock=lambda: now[0])

    async def scenario() -> None:
        await loads.poll_all()
        assert loads.get("d:1") == IDLE
        worker.serving = None  # no answer from now on
        now[0] = 1.5
        await loads.poll_all()
        assert loads.get("d:1") == IDLE  # 1.5 s old: still fresh
        now[0] = 2.5
        assert loads.get("d:1") is None  # stale: out of the cost model's rotation
        worker.serving = True
        await loads.poll_all()
        assert loads.get("d:1") == IDLE
        await loads.set_decode([])
        assert loads.get("d:1") is None  # left the membership: forgotten

    asyncio.run(scenario())


def test_real_workers_publish_what_the_router_matches(tiny_llama: Path) -> None:
    """Two decode workers over gRPC: the one that served a prompt is where its longer
    next turn goes, from its published prefix summary and measured rates."""
    engine = EngineConfig(model=str(tiny_llama), dtype="float32", num_kv_blocks=128)
    turn1 = list(range(5, 105))
    other = list(range(105, 205))
    params = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)

    async def serve(worker: object, prompt: list[int]) -> None:
        async for _ in worker.engine.generate("warm", prompt, params):  # type: ignore[attr-defined]
            pass

    async def scenario() -> None:
        d1, d2 = [await start_worker(WorkerConfig(role="decode", engine=engine), DecodeServicer)
                  for _ in range(2)]
        clients = DecodeClients()
        try:
            await serve(d1, other)
            await serve(d2, turn1)
            loads = WorkerLoads(clients, [d1.address, d2.address], [])
            await loads.poll_all()
            s2 = loads.get(d2.address)
            assert s2 is not None and s2.prefill_tokens_per_s > 0 and s2.num_running == 0
            assert s2.cached_tokens(s2.prompt_hashes(turn1)) == 96  # 6 full blocks of 99
            spec = d2.engine.engine.spec  # fp32 KV on the wire (the model's dtype)
            per_layer = spec.num_kv_heads * spec.head_dim
            assert s2.kv_bytes_per_token == 2 * spec.num_layers * per_layer * 4
            assert s2.kv_bytes_per_token_by_encoding[4] == \
                2 * spec.num_layers * (per_layer + spec.num_kv_heads * 4)  # int8 + fp32 scales
            assert s2.kv_pending_bytes == 0
            policy = CostModelPolicy([d1.address, d2.address], [], 16, loads.get, 0.1)
            for _ in range(2):
                choice = policy.choose([*turn1, 7, 8, 9])
                assert choice is not None and choice.decode.address == d2.address
        finally:
            await clients.close()
            await d1.stop(0)
            await d2.stop(0)

    asyncio.run(scenario())


def test_prompts_sent_since_the_last_state_count_in_the_queue() -> None:
    decoding = replace(IDLE, num_running=8)
    policy = _policy({"d:1": decoding, "p:1": PREFILL}, ("d:1",))
    long = list(range(1, 2049))
    first = policy.choose(long)
    assert first is not None and first.plan == "remote"
    policy.dispatched("long", first, len(long))
    # The prefill worker's state still says idle: the router knows better.
    short = policy.choose(PROMPT[:128])
    assert short is not None and short.plan == "local"
    policy.prefill_finished("long", 2.0)
    again = policy.choose(PROMPT[:128])
    assert again is not None and again.plan == "remote"
    policy.ended("long")
    assert nothing_in_flight(policy) and policy.prefill[0].prefilling_tokens == 0


def test_each_plan_learns_what_its_formula_leaves_out() -> None:
    policy = _policy({"d:1": replace(IDLE, num_running=8), "p:1": PREFILL}, ("d:1",))
    choice = policy.choose(PROMPT)
    assert choice is not None and choice.plan == "remote"
    assert choice.predicted_ttft_s == pytest.approx(0.512)
    policy.dispatched("a", choice, len(PROMPT))
    policy.prefill_finished("a", 1.012)  # 0.5 s more than predicted
    policy.ended("a")
    assert policy.offset_s == {"remote": pytest.approx(0.05), "local": 0.0}
    later = policy.choose(PROMPT)  # a tenth of the residual, still under local's 0.73 s
    assert later is not None and later.plan == "remote"
    assert later.predicted_ttft_s == pytest.approx(0.562)


def test_over_predictions_lower_the_offset_but_never_below_zero() -> None:
    policy = _policy({"d:1": IDLE, "p:1": PREFILL}, ("d:1",))
    policy.offset_s = {"local": -5.0, "remote": -5.0}  # learned from big over-predictions
    choice = policy.choose(PROMPT)
    assert choice is not None and choice.predicted_ttft_s == 0.0
    policy.dispatched("a", choice, len(PROMPT))
    policy.prefill_finished("a", 0.3)
    policy.ended("a")
    assert policy.offset_s[choice.plan] == pytest.approx(-5.0 + 0.03)


def test_a_state_reply_no_worker_could_send_counts_as_no_answer() -> None:
    good = worker_pb2.WorkerStateReply(role="decode", num_free_blocks=1, num_blocks=2,
                                       block_size=16, kv_link_bytes_per_s=5.0,
                                       kv_bytes_per_token_by_encoding={4: 500.0},
                                       kv_pending_bytes=7)
    load = _load_from_pb(good)
    assert load is not None and load.kv_bytes_per_token_by_encoding == {4: 500.0}
    assert load.kv_pending_bytes == 7 and load.kv_link_bytes_per_s == 5.0
    for bad in [{"kv_bytes_per_token_by_encoding": {99: 1.0}},  # no such encoding
                {"kv_bytes_per_token_by_encoding": {4: float("nan")}},
                {"kv_bytes_per_token_by_encoding": {4: 0.0}},
                {"kv_link_bytes_per_s": -1.0}, {"num_free_blocks": 3}, {"block_size": 0}]:
        reply = worker_pb2.WorkerStateReply()
        reply.CopyFrom(good)
        for name, value in bad.items():
            if isinstance(value, dict):
                getattr(reply, name).clear()
                getattr(reply, name).update(value)
            else:
                setattr(reply, name, value)
        assert _load_from_pb(reply) is None, bad
