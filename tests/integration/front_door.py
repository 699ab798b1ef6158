"""Helpers of the front-door tests: free ports, scrapes, extra router processes."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from pdserve.cluster_config import ClusterConfig, Member
from pdserve.process_launcher import start, stop


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def split_cluster(model_dir: Path, decode: int = 1, **overrides: Any) -> ClusterConfig:
    """The real model in fp32 on free ports: one prefill worker on CPU 0, ``decode``
    decode workers on CPU 1, a thread each, the router's HTTP port off unless given."""
    fields: dict[str, Any] = {
        "model": str(model_dir), "dtype": "float32", "router_port": free_port(),
        "http_port": 0, "prefill": [Member(free_port(), free_port(), (0,), 1)],
        "decode": [Member(free_port(), free_port(), (1,), 1) for _ in range(decode)]}
    return ClusterConfig(**{**fields, **overrides})


@contextmanager
def running(c: ClusterConfig, log_dir: Path | None = None) -> Iterator[ClusterConfig]:
    """``c`` as plain processes (the process launcher), stopped on the way out."""
    procs = start(c, timeout=300, log_dir=log_dir)
    try:
        yield c
    finally:
        stop(procs)


def scrape(port: int) -> dict[str, float]:
    """Every sample of a /metrics page, summed over labels, by sample name."""
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(body):
        for s in family.samples:
            if "le" in s.labels:  # histogram buckets: _count and _sum say enough
                continue
            out[s.name] = out.get(s.name, 0.0) + s.value
    return out


def pools_empty(c: ClusterConfig) -> bool:
    for port in (c.prefill[0].metrics_port, c.decode[0].metrics_port):
        m = scrape(port)
        if m["pdserve:kv_cache_usage_perc"] or m["pdserve:num_requests_running"]:
            return False
    return True


def wait_pools_empty(c: ClusterConfig, within_s: float = 3.0) -> None:
    t0 = time.monotonic()
    while not pools_empty(c):
        assert time.monotonic() - t0 < within_s, f"blocks still held {within_s} s later"
        time.sleep(0.05)


def health(address: str, service: str = "") -> int | None:
    """The grpc.health.v1 status, or None when nothing answers."""
    with grpc.insecure_channel(address) as ch:
        try:
            r = health_pb2_grpc.HealthStub(ch).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=2)
        except grpc.RpcError:
            return None
        return int(r.status)


def wait_health(address: str, status: int, within_s: float = 20.0) -> None:
    t0 = time.monotonic()
    while health(address) != status:
        assert time.monotonic() - t0 < within_s, f"{address} never reached health {status}"
        time.sleep(0.1)


def http_get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def http_post(url: str, body: bytes, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    req = urllib.request.Request(url, data=body, method="POST",
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


@contextmanager
def router_process(model: str, decode: str, grpc_port: int, http_port: int,
                   *extra: str) -> Iterator[subprocess.Popen[bytes]]:
    """A second router (no API key) in front of ``decode``."""
    env = {k: v for k, v in os.environ.items() if k != "PDSERVE_API_KEY"}
    p = subprocess.Popen([sys.executable, "-m", "router", "--model", model, "--decode", decode,
                          "--port", str(grpc_port), "--http-port", str(http_port),
                          "--health-interval", "0.2", *extra], env=env)
    try:
        yield p
    finally:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
        try:
            p.wait(timeout=15)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
