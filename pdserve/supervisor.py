"""Keeps a cluster's processes running: a process that exits is started again (same
command, so the same port) after a backoff, until it crashed too often.

Per supervised process (``Child``)::

    STARTING ─health SERVING─────────────────────────────────▶ RUNNING
    STARTING ─exited, or not SERVING within start_timeout_s──▶ EXITED (killed if need be)
    RUNNING  ─exited─────────────────────────────────────────▶ EXITED
    EXITED   ─fewer than max_crashes within crash_window_s───▶ BACKOFF
    EXITED   ─max_crashes within crash_window_s──────────────▶ GAVE_UP (logged; the rest stays up)
    BACKOFF  ─backoff over───────────────────────────────────▶ STARTING (a restart, counted)
    any      ─Supervisor.stop()──────────────────────────────▶ STOPPING ─▶ STOPPED

The backoff starts at ``initial_backoff_s`` and doubles per crash up to
``max_backoff_s``; ``healthy_reset_s`` of RUNNING resets it. Every restart is logged
with the running total (``worker_restarts_total``). The ``Supervisor`` ticks every
child from its own thread; ``stop`` ends that thread first, so nothing restarts while
the cluster stops (router first: the last child added is stopped first).
"""

from __future__ import annotations

import enum
import logging
import os
import signal
import subprocess
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from pdserve.config import RestartPolicy

log = logging.getLogger("pdserve.supervisor")
Clock = Callable[[], float]
DEFAULT_POLICY = RestartPolicy()


class ChildState(enum.Enum):
    STARTING = "starting"
    RUNNING = "running"
    EXITED = "exited"
    BACKOFF = "backoff"
    GAVE_UP = "gave_up"
    STOPPING = "stopping"
    STOPPED = "stopped"


@dataclass(frozen=True)
class ChildSpec:
    """What to run and how to tell that it serves."""

    name: str
    argv: list[str]
    env: dict[str, str]
    ready: Callable[[], bool]
    """True once the process serves (a grpc.health.v1 probe, for the real roles)."""
    log_file: Path | None = None
    """Append the process's stderr here (None: inherit ours)."""


@dataclass
class Child:
    spec: ChildSpec
    policy: RestartPolicy
    clock: Clock
    state: ChildState = ChildState.STOPPED
    proc: subprocess.Popen[bytes] | None = None
    restarts: int = 0
    exit_code: int | None = None
    backoff_s: float = 0.0
    since: float = 0.0  # when the current state began
    crashes: deque[float] = field(default_factory=deque)

    def __post_init__(self) -> None:
        self.backoff_s = self.policy.initial_backoff_s

    @property
    def name(self) -> str:
        return self.spec.name

    def spawn(self) -> None:
        """→ STARTING."""
        err = open(self.spec.log_file, "ab") if self.spec.log_file else None  # noqa: SIM115
        try:
            self.proc = subprocess.Popen(self.spec.argv, env={**os.environ, **self.spec.env},
                                         stderr=err)
        finally:
            if err is not None:
                err.close()  # the child holds its own copy
        self._enter(ChildState.STARTING)

    def tick(self) -> None:
        """One look at the child: the transition its state and the clock call for."""
        handlers = {ChildState.STARTING: self._tick_starting, ChildState.RUNNING: self._tick_running,
                    ChildState.EXITED: self._decide, ChildState.BACKOFF: self._tick_backoff}
        handler = handlers.get(self.state)
        if handler is not None:
            handler()

    def _tick_starting(self) -> None:
        if self._exited():
            return
        if self.spec.ready():
            self._enter(ChildState.RUNNING)
        elif self.clock() - self.since > self.policy.start_timeout_s:
            log.error("%s not serving after %.0f s; killing it", self.name,
                      self.policy.start_timeout_s)
            self._kill()
            self._exited()

    def _tick_running(self) -> None:
        if self._exited():
            return
        if self.backoff_s != self.policy.initial_backoff_s and \
                self.clock() - self.since >= self.policy.healthy_reset_s:
            self.backoff_s = self.policy.initial_backoff_s

    def _exited(self) -> bool:
        """→ EXITED when the process is gone."""
        assert self.proc is not None
        code = self.proc.poll()
        if code is None:
            return False
        self.exit_code = code
        self.crashes.append(self.clock())
        self._enter(ChildState.EXITED)
        return True

    def _decide(self) -> None:
        """EXITED → BACKOFF, or GAVE_UP after too many crashes in the window."""
        now, p = self.clock(), self.policy
        while self.crashes and now - self.crashes[0] > p.crash_window_s:
            self.crashes.popleft()
        if len(self.crashes) >= p.max_crashes:
            log.error("%s exited with %s, its %d. exit within %.0f s: giving up on it "
                      "(the rest of the cluster stays up)", self.name, self.exit_code,
                      len(self.crashes), p.crash_window_s)
            self._enter(ChildState.GAVE_UP)
            return
        log.warning("%s exited with %s; restarting it in %.1f s", self.name, self.exit_code,
                    self.backoff_s)
        self._enter(ChildState.BACKOFF)

    def _tick_backoff(self) -> None:
        """BACKOFF → STARTING once the backoff is over; the next one doubles."""
        if self.clock() - self.since < self.backoff_s:
            return
        self.backoff_s = min(self.backoff_s * 2, self.policy.max_backoff_s)
        self.restarts += 1
        log.warning("restarting %s", self.name,
                    extra={"child": self.name, "worker_restarts_total": self.restarts})
        self.spawn()

    def stop(self) -> None:
        """→ STOPPING: SIGTERM (the role drains); ``wait_stopped`` kills at its deadline."""
        self._enter(ChildState.STOPPING)
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def wait_stopped(self, deadline: float) -> None:
        """STOPPING → STOPPED."""
        if self.proc is not None:
            try:
                self.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self._kill()
        self._enter(ChildState.STOPPED)

    def _kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()

    def _enter(self, state: ChildState) -> None:
        self.state, self.since = state, self.clock()


class Supervisor:
    def __init__(self, policy: RestartPolicy = DEFAULT_POLICY, interval_s: float = 0.5,
                 clock: Clock = time.monotonic) -> None:
        self.policy, self.interval_s, self.clock = policy, interval_s, clock
        self.children: list[Child] = []
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()  # one tick at a time; stop waits for it

    def add(self, spec: ChildSpec) -> Child:
        """Start a process under supervision (STARTING)."""
        child = Child(spec, self.policy, self.clock)
        child.spawn()
        self.children.append(child)
        return child

    def child(self, name: str) -> Child:
        return next(c for c in self.children if c.name == name)

    @property
    def restarts_total(self) -> int:
        return sum(c.restarts for c in self.children)

    def wait_running(self, timeout: float) -> None:
        """Tick until every child is RUNNING; RuntimeError if one exits first (a first
        start that fails is a configuration problem, not a crash to retry) or on timeout."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.tick()
            exited = [c for c in self.children if c.state is ChildState.EXITED]
            if exited:
                c = exited[0]
                raise RuntimeError(f"{c.name} exited with {c.exit_code} while starting")
            if all(c.state is ChildState.RUNNING for c in self.children):
                return
            time.sleep(0.2)
        raise RuntimeError(f"the cluster did not become SERVING within {timeout:.0f} s")

    def tick(self) -> None:
        with self._lock:
            if self._stopping.is_set():
                return
            for c in self.children:
                c.tick()

    def run_in_background(self) -> None:
        self._thread = threading.Thread(target=self._run, name="supervisor", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stopping.wait(self.interval_s):
            try:
                self.tick()
            except Exception:  # a supervisor bug must not leave the cluster unwatched
                log.exception("supervisor tick failed")

    def gave_up(self, name: str) -> bool:
        return self.child(name).state is ChildState.GAVE_UP

    def stop(self, grace: float = 15) -> None:
        """STOPPING (no more restarts) → every child SIGTERM, last added first, then
        SIGKILL after ``grace`` → STOPPED."""
        self._stopping.set()
        with self._lock:  # a tick in progress ends first
            pass
        if self._thread is not None:
            self._thread.join()
        deadline = time.monotonic() + grace
        for c in reversed(self.children):
            c.stop()
        for c in reversed(self.children):
            c.wait_stopped(deadline)
