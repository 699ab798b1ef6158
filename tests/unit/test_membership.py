"""Router membership from stdin lines (what the Ray router actor writes)."""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from router.membership import follow, parse_members
from router.policy import Member
from tests.router_fakes import load_aware


def test_parse_members_validates() -> None:
    assert parse_members('{"decode": ["a:1"], "prefill": []}') == (["a:1"], [])
    with pytest.raises(ValueError, match="host:port"):
        parse_members('{"decode": ["nocolon"]}')
    with pytest.raises(ValueError, match="decode and prefill"):
        parse_members('{"workers": []}')


def test_follow_applies_updates_and_keeps_in_flight_counts() -> None:
    policy = load_aware([])
    lines = iter([json.dumps({"decode": ["d:1"], "prefill": ["p:1"]}), "not json {\n",  # logged and skipped
                  json.dumps({"decode": ["d:1", "d:2"], "prefill": []}), ""])
    seen: list[Member] = []

    def readline() -> str:
        line = next(lines)
        if line.startswith('{"decode": ["d:1", "d:2"]'):
            # The pump thread reads ahead of the loop: wait until the first update is applied.
            deadline = time.monotonic() + 2
            while not policy.decode and time.monotonic() < deadline:
                time.sleep(0.01)
            seen.append(policy.decode[0])
            policy.decode[0].in_flight_tokens = 7
        return line

    async def run() -> None:
        await asyncio.wait_for(follow(policy, readline), timeout=5)

    asyncio.run(run())
    assert [m.address for m in policy.decode] == ["d:1", "d:2"] and policy.prefill == []
    assert policy.decode[0] is seen[0] and policy.decode[0].in_flight_tokens == 7
    assert policy.choose([1] * 100).decode.address == "d:2"  # type: ignore[union-attr]
