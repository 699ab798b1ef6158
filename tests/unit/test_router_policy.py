"""LoadAwarePolicy: which decode worker, local or remote prefill, and the in-flight
accounting the router reports to it (dispatched → prefill finished → ended)."""

from __future__ import annotations

from pdserve.config import RouterConfig
from router.policy import Choice, LoadAwarePolicy, make_policy
from tests.router_fakes import load_aware, nothing_in_flight


def _decode(c: Choice | None) -> str:
    assert c is not None
    return c.decode.address


def test_least_loaded_decode_worker_wins() -> None:
    policy = load_aware(["d:1", "d:2", "d:3"])
    policy.dispatched("a", Choice(policy.decode[0], None), 30)
    policy.dispatched("b", Choice(policy.decode[2], None), 10)
    assert _decode(policy.choose([1] * 100)) == "d:2"
    policy.dispatched("c", Choice(policy.decode[1], None), 20)
    assert _decode(policy.choose([1] * 100)) == "d:3"  # 10 tokens beat 20 and 30
    for rid in "abc":
        policy.ended(rid)
    assert nothing_in_flight(policy)


def test_ties_rotate_over_every_member() -> None:
    policy = load_aware(["d:1", "d:2", "d:3"])
    picks = [_decode(policy.choose([1] * 100)) for _ in range(6)]
    assert sorted(picks[:3]) == ["d:1", "d:2", "d:3"] and picks[3:] == picks[:3]
    assert nothing_in_flight(policy)


def test_excluded_workers_are_never_chosen() -> None:
    policy = load_aware(["d:1", "d:2", "d:3"])
    assert {_decode(policy.choose([1] * 100, {"d:1", "d:3"})) for _ in range(4)} == {"d:2"}
    assert policy.choose([1] * 100, {"d:1", "d:2", "d:3"}) is None
    assert load_aware([]).choose([1] * 100) is None
    assert nothing_in_flight(policy)


def test_short_prompts_prefill_locally_long_ones_remotely() -> None:
    policy = load_aware(["d:1"], ["p:1"], local_prefill_below=16)
    short, at = policy.choose([1] * 15), policy.choose([1] * 16)
    assert short is not None and short.prefill is None and short.plan == "local"
    assert at is not None and at.prefill is not None and at.prefill.address == "p:1"
    assert at.plan == "remote"
    no_prefill = load_aware(["d:1"], [], local_prefill_below=16).choose([1] * 1000)
    assert no_prefill is not None and no_prefill.plan == "local"
    assert nothing_in_flight(policy)


def test_least_busy_prefill_worker_wins() -> None:
    policy = load_aware(["d:1"], ["p:1", "p:2"], local_prefill_below=1)
    first = policy.choose([1] * 50)
    assert first is not None and first.prefill is not None
    policy.dispatched("a", first, 50)
    second = policy.choose([1] * 50)
    assert second is not None and second.prefill is not None
    assert {first.prefill.address, second.prefill.address} == {"p:1", "p:2"}
    policy.ended("a")
    assert nothing_in_flight(policy)


def test_accounting_follows_the_request() -> None:
    policy = load_aware(["d:1"], ["p:1"], local_prefill_below=1)
    choice = policy.choose([1] * 40)
    assert choice is not None and choice.prefill is not None
    policy.dispatched("r", choice, 40)
    d, p = policy.decode[0], policy.prefill[0]
    assert (d.in_flight_tokens, d.in_flight_requests, p.in_flight_requests) == (40, 1, 1)
    assert policy.in_flight == 1
    policy.prefill_finished("r")  # first token: the prefill worker is done with it
    assert (d.in_flight_tokens, d.in_flight_requests, p.in_flight_requests) == (40, 1, 0)
    policy.prefill_finished("r")  # told twice: counted once
    assert p.in_flight_requests == 0
    policy.ended("r")
    policy.ended("r")  # told twice, or never dispatched: nothing to release
    policy.ended("never-dispatched")
    assert nothing_in_flight(policy)


def test_an_end_before_the_first_token_releases_the_prefill_worker_too() -> None:
    policy = load_aware(["d:1"], ["p:1"], local_prefill_below=1)
    choice = policy.choose([1] * 40)
    assert choice is not None
    policy.dispatched("r", choice, 40)
    policy.ended("r")  # retried, failed or aborted before any token
    assert nothing_in_flight(policy)


def test_membership_changes_keep_counts_and_never_go_negative() -> None:
    policy = load_aware(["d:1", "d:2"])
    choice = policy.choose([1] * 10, {"d:2"})
    assert choice is not None
    policy.dispatched("r", choice, 10)
    policy.set_members(["d:2"], [])  # d:1 leaves with a request in flight
    policy.set_members(["d:1", "d:2"], [])  # and comes back: a new member, at zero
    assert policy.decode[0].in_flight_tokens == 0
    policy.ended("r")  # released on the member it was dispatched to
    assert nothing_in_flight(policy)


def test_the_config_names_the_policy() -> None:
    config = RouterConfig(decode=("d:1",), prefill=("p:1",), local_prefill_below=7)
    policy = make_policy(config)
    assert isinstance(policy, LoadAwarePolicy)
    assert [m.address for m in policy.decode] == ["d:1"] and policy.local_prefill_below == 7
    assert nothing_in_flight(policy)
