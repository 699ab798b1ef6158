"""``launcher: process`` keeps the cluster up (tiny model, real processes): a decode
worker killed with -9 is routed around while it is down, restarted on its own port,
SERVING again and back in the router's rotation; a killed router is restarted too;
no request hangs; stop() ends everything."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest

from pdserve.client import Client
from pdserve.cluster_config import ClusterConfig, Member
from pdserve.config import RestartPolicy
from pdserve.launch import probe_serving
from pdserve.process_launcher import start, stop
from pdserve.supervisor import ChildState, Supervisor
from tests.integration.front_door import free_port, scrape

TIMEOUT_S = 30.0  # each request's deadline: an outcome, never a hang
BACKOFF = RestartPolicy(initial_backoff_s=4.0)  # a window to observe the routing around


def _member() -> Member:
    return Member(free_port(), free_port(), None, 1)


@pytest.fixture(scope="module")
def cluster(tiny_llama: Path,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ClusterConfig, Supervisor]]:
    c = ClusterConfig(model=str(tiny_llama), dtype="float32", launcher="process", pin="off",
                      router_port=free_port(), http_port=0,
                      prefill=[_member()], decode=[_member(), _member()])
    supervisor = start(c, timeout=180, log_dir=tmp_path_factory.mktemp("logs"), restart=BACKOFF)
    try:
        yield c, supervisor
    finally:
        stop(supervisor)
    assert all(ch.state is ChildState.STOPPED for ch in supervisor.children)
    assert all(ch.proc is not None and ch.proc.poll() is not None for ch in supervisor.children)


def _ask(c: ClusterConfig) -> grpc.StatusCode:
    """One request on a fresh channel; its status (OK when all 8 tokens came)."""
    client = Client(f"127.0.0.1:{c.router_port}", timeout=TIMEOUT_S)
    t0 = time.monotonic()
    try:
        n = sum(len(d.token_ids) for d in client.generate(
            "The quick brown fox", max_tokens=8, ignore_eos=True, temperature=0))
        assert n == 8
        return grpc.StatusCode.OK
    except grpc.RpcError as e:
        assert e.code() != grpc.StatusCode.DEADLINE_EXCEEDED, "a request hung"
        return e.code()  # type: ignore[no-any-return]
    finally:
        client.close()
        assert time.monotonic() - t0 < TIMEOUT_S + 5


def _until(what: str, ok: Callable[[], bool], timeout: float = 120) -> None:
    t0 = time.monotonic()
    while not ok():
        assert time.monotonic() < t0 + timeout, what
        time.sleep(0.1)
    print(f"{what}: {time.monotonic() - t0:.1f} s")


def test_killed_decode_worker_is_routed_around_restarted_and_used_again(
        cluster: tuple[ClusterConfig, Supervisor]) -> None:
    c, sup = cluster
    victim, port = sup.child("decode-2"), c.decode[1].port
    assert victim.proc is not None
    os.kill(victim.proc.pid, signal.SIGKILL)
    _until("the supervisor saw the exit", lambda: victim.state is ChildState.BACKOFF, 30)
    # While it is down: requests end (some may fail UNAVAILABLE until the router's
    # probe marks it down), and then succeed through the other decode worker.
    statuses = [_ask(c) for _ in range(3)]
    assert set(statuses) <= {grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE}, statuses
    _until("requests succeed while a decode worker is down",
           lambda: _ask(c) is grpc.StatusCode.OK and victim.state is not ChildState.RUNNING, 30)
    _until("the worker came back", lambda: victim.state is ChildState.RUNNING, 120)
    assert victim.restarts == 1 and victim.exit_code == -signal.SIGKILL
    assert probe_serving(f"127.0.0.1:{port}")  # same port, SERVING
    # Back in rotation: concurrent requests reach the fresh process too.
    metrics_port = c.decode[1].metrics_port

    def used_again() -> bool:
        with ThreadPoolExecutor(6) as pool:
            assert all(s is grpc.StatusCode.OK for s in pool.map(lambda _: _ask(c), range(6)))
        return scrape(metrics_port).get("pdserve:generation_tokens_total", 0) > 0

    _until("the router routes to the restarted worker", used_again, 60)


def test_killed_router_is_restarted(cluster: tuple[ClusterConfig, Supervisor]) -> None:
    c, sup = cluster
    router = sup.child("router")
    assert router.proc is not None
    os.kill(router.proc.pid, signal.SIGKILL)
    _until("the supervisor saw the exit", lambda: router.state is ChildState.BACKOFF, 30)
    _until("the router came back", lambda: router.state is ChildState.RUNNING, 120)
    assert router.restarts == 1
    _until("the restarted router serves", lambda: _ask(c) is grpc.StatusCode.OK, 30)
