"""Decode worker health as the router sees it (router/health.py): UNKNOWN → UP →
DOWN after misses or NOT_SERVING → UP again, and ``on_change`` only when the
router's usability flips."""

from __future__ import annotations

import asyncio

from router.health import DecodeHealth, WorkerState
from tests.router_fakes import FakeDecodeBackend, FakeDecodeWorker


class _Changes:
    def __init__(self) -> None:
        self.seen: list[bool] = []

    async def __call__(self, usable: bool) -> None:
        self.seen.append(usable)


def _health(*workers: FakeDecodeWorker, misses_to_down: int = 3,
            ) -> tuple[DecodeHealth, _Changes]:
    changes = _Changes()
    health = DecodeHealth([w.address for w in workers], FakeDecodeBackend(workers), changes,
                          misses_to_down=misses_to_down)
    return health, changes


def test_up_then_down_after_misses_then_up_again() -> None:
    worker = FakeDecodeWorker("d:1")
    health, changes = _health(worker)
    assert health.state("d:1") is WorkerState.UNKNOWN and not health.usable
    assert health.down() == {"d:1"}  # not answered yet: not routed to

    async def scenario() -> None:
        await health.probe_all()
        assert health.state("d:1") is WorkerState.UP and health.usable
        worker.serving = None  # slow: no answer in time
        for _ in range(2):
            await health.probe_all()
            assert health.state("d:1") is WorkerState.UP  # a miss is not yet a death
        await health.probe_all()
        assert health.state("d:1") is WorkerState.DOWN and not health.usable
        worker.serving = True
        await health.probe_all()
        assert health.state("d:1") is WorkerState.UP and health.down() == set()

    asyncio.run(scenario())
    assert changes.seen == [True, False, True]


def test_not_serving_is_down_at_once_and_an_answer_resets_the_misses() -> None:
    worker = FakeDecodeWorker("d:1")
    health, changes = _health(worker, misses_to_down=2)

    async def scenario() -> None:
        await health.probe_all()
        worker.serving = None
        await health.probe_all()  # one miss
        worker.serving = True
        await health.probe_all()  # answered: the count starts over
        worker.serving = None
        await health.probe_all()
        assert health.state("d:1") is WorkerState.UP
        worker.serving = False  # NOT_SERVING (or refused): down without waiting
        await health.probe_all()
        assert health.state("d:1") is WorkerState.DOWN

    asyncio.run(scenario())
    assert changes.seen == [True, False]


def test_a_miss_before_any_answer_is_down() -> None:
    health, changes = _health(FakeDecodeWorker("d:1", serving=None))
    asyncio.run(health.probe_all())
    assert health.state("d:1") is WorkerState.DOWN
    assert changes.seen == [False]  # first verdict: told once, then only on flips


def test_on_change_fires_only_when_usability_flips() -> None:
    a, b = FakeDecodeWorker("d:1"), FakeDecodeWorker("d:2")
    health, changes = _health(a, b)

    async def scenario() -> None:
        await health.probe_all()
        a.serving = False
        await health.probe_all()  # d:2 still up: still usable, nothing to tell
        assert health.up == {"d:2"} and health.usable
        b.serving = False
        await health.probe_all()
        assert not health.usable

    asyncio.run(scenario())
    assert changes.seen == [True, False]


def test_membership_changes_keep_known_states() -> None:
    a, b = FakeDecodeWorker("d:1"), FakeDecodeWorker("d:2", serving=None)
    health, changes = _health(a, b)

    async def scenario() -> None:
        await health.probe_all()
        await health.set_addresses(["d:2"])  # d:1 leaves: nothing up
        assert health.addresses == ["d:2"] and not health.usable
        b.serving = True
        await health.set_addresses(["d:2", "d:1"])  # probed at once
        assert health.up == {"d:1", "d:2"}

    asyncio.run(scenario())
    assert changes.seen == [True, False, True]
