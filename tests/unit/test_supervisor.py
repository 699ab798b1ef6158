"""The supervisor's lifecycle with real (tiny) processes and a fake clock: a process
that exits is restarted after a doubling backoff, the backoff resets after a healthy
minute, too many crashes in the window give that one up while the rest runs, a
process that never serves is killed, and stop() restarts nothing."""

from __future__ import annotations

import sys
import time

import pytest

from pdserve.config import RestartPolicy
from pdserve.supervisor import Child, ChildSpec, ChildState, Supervisor

SLEEPER = [sys.executable, "-c", "import time; time.sleep(60)"]
CRASHER = [sys.executable, "-c", "raise SystemExit(3)"]
POLICY = RestartPolicy(initial_backoff_s=1, max_backoff_s=4, healthy_reset_s=60,
                       max_crashes=4, crash_window_s=100, start_timeout_s=30)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _supervisor(clock: FakeClock) -> Supervisor:
    return Supervisor(POLICY, clock=clock)


def _spec(name: str, argv: list[str], ready: bool = True) -> ChildSpec:
    return ChildSpec(name, argv, {}, lambda: ready)


def _crash(sup: Supervisor, child: Child) -> None:
    """Kill the child's process and let the supervisor see it: EXITED → decided."""
    assert child.proc is not None
    child.proc.kill()
    child.proc.wait()
    sup.tick()  # → EXITED
    sup.tick()  # → BACKOFF or GAVE_UP


def test_an_exited_process_restarts_after_a_doubling_backoff() -> None:
    clock = FakeClock()
    sup = _supervisor(clock)
    try:
        child = sup.add(_spec("decode-0", SLEEPER))
        sup.tick()
        assert child.state is ChildState.RUNNING
        for backoff in (1, 2, 4):
            first_pid = child.proc.pid if child.proc else 0
            _crash(sup, child)
            assert child.state is ChildState.BACKOFF and child.exit_code == -9
            clock.now += backoff - 0.1
            sup.tick()
            assert child.state is ChildState.BACKOFF  # not yet
            clock.now += 0.1
            sup.tick()
            assert child.state is ChildState.STARTING and child.proc is not None
            assert child.proc.pid != first_pid
            sup.tick()
            assert child.state is ChildState.RUNNING
        assert child.backoff_s == 4  # capped at max_backoff_s
        assert child.restarts == 3 and sup.restarts_total == 3
        clock.now += 60  # a healthy minute
        sup.tick()
        assert child.backoff_s == 1
    finally:
        sup.stop(grace=5)
    assert child.state is ChildState.STOPPED and child.proc is not None
    assert child.proc.poll() is not None


def test_too_many_crashes_in_the_window_give_up_that_child_only() -> None:
    clock = FakeClock()
    sup = _supervisor(clock)
    try:
        crasher = sup.add(_spec("decode-0", CRASHER, ready=False))
        steady = sup.add(_spec("decode-1", SLEEPER))
        for crash in range(1, POLICY.max_crashes + 1):
            assert crasher.proc is not None
            crasher.proc.wait()
            sup.tick()  # → EXITED
            sup.tick()  # → decided
            if crash < POLICY.max_crashes:
                assert crasher.state is ChildState.BACKOFF
                clock.now += crasher.backoff_s
                sup.tick()  # → STARTING
        assert crasher.state is ChildState.GAVE_UP and sup.gave_up("decode-0")
        assert crasher.exit_code == 3 and crasher.restarts == POLICY.max_crashes - 1
        clock.now += 1000
        sup.tick()
        assert crasher.state is ChildState.GAVE_UP  # stays given up
        assert steady.state is ChildState.RUNNING and steady.restarts == 0
    finally:
        sup.stop(grace=5)
    assert all(c.state is ChildState.STOPPED for c in sup.children)


def test_crashes_outside_the_window_do_not_count() -> None:
    clock = FakeClock()
    sup = _supervisor(clock)
    try:
        child = sup.add(_spec("router", SLEEPER))
        for _ in range(POLICY.max_crashes * 2):
            sup.tick()
            _crash(sup, child)
            assert child.state is ChildState.BACKOFF
            clock.now += POLICY.crash_window_s / 2  # only two in any window
            sup.tick()
        assert child.restarts == POLICY.max_crashes * 2
    finally:
        sup.stop(grace=5)


def test_a_process_that_never_serves_is_killed_and_restarted() -> None:
    clock = FakeClock()
    sup = _supervisor(clock)
    try:
        child = sup.add(_spec("prefill-0", SLEEPER, ready=False))
        sup.tick()
        assert child.state is ChildState.STARTING
        clock.now += POLICY.start_timeout_s + 1
        sup.tick()
        assert child.state is ChildState.EXITED and child.exit_code == -9
        sup.tick()
        assert child.state is ChildState.BACKOFF
    finally:
        sup.stop(grace=5)


def test_stop_restarts_nothing_and_stops_every_process() -> None:
    sup = Supervisor(RestartPolicy(initial_backoff_s=0.2), interval_s=0.05)
    child = sup.add(_spec("decode-0", SLEEPER))
    other = sup.add(_spec("router", SLEEPER))
    sup.wait_running(30)
    sup.run_in_background()
    assert child.proc is not None
    child.proc.kill()
    deadline = time.monotonic() + 30
    while child.state is not ChildState.BACKOFF:
        assert time.monotonic() < deadline, child.state
        time.sleep(0.01)
    sup.stop(grace=5)  # inside the 0.2 s backoff
    time.sleep(0.3)
    assert child.restarts == 0 and child.state is ChildState.STOPPED
    assert other.state is ChildState.STOPPED and other.proc is not None
    assert other.proc.poll() is not None


def test_a_first_start_that_fails_is_an_error_not_a_restart() -> None:
    sup = Supervisor(POLICY)
    sup.add(_spec("decode-0", CRASHER, ready=False))
    try:
        with pytest.raises(RuntimeError, match="decode-0 exited with 3 while starting"):
            sup.wait_running(30)
    finally:
        sup.stop(grace=5)
