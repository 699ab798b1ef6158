"""``pdserve up``: router, prefill and decode workers, as Ray actors or plain processes.

A cluster config (YAML) names the model, dtype, KV encoding, the launcher, the
router's ports and API key, and each member's ports (and optionally CPUs); without
one, the defaults below: router gRPC :50051 and OpenAI HTTP :8000, prefill :50061
(metrics :9061), decode :50071 (metrics :9071). Workers pin themselves
(pdserve/placement.py): without explicit ``cpus`` worker i of n on a machine gets
its share of the NUMA nodes and CPUs, so on a 2-CPU box prefill runs on CPU 0 and
decode on CPU 1, one torch thread each.

``launcher: ray`` (the default) is deploy/ray/launcher.py; ``launcher: process``
(Kubernetes, or no Ray) is this module:
STARTING (workers load; health polled) → SERVING (endpoints printed) → STOPPING
(Ctrl-C or SIGTERM: every child gets SIGTERM, then SIGKILL after a grace period).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pdserve.config import DTYPES, KV_ENCODINGS, PREFILL_FALLBACKS
from pdserve.placement import PIN_MODES

LAUNCHERS: tuple[str, ...] = ("ray", "process")


@dataclass(frozen=True)
class Member:
    port: int
    metrics_port: int = 0
    cpus: tuple[int, ...] | None = None
    threads: int | None = None


def _default_members() -> tuple[list[Member], list[Member]]:
    return [Member(50061, 9061)], [Member(50071, 9071)]


def scaled(members: list[Member], n: int, default: Member) -> list[Member]:
    """``--prefill N``: N members, ports counting up from the first configured one."""
    base = members[0] if members else default
    return [Member(base.port + i if base.port else 0,
                   base.metrics_port + i if base.metrics_port else 0,
                   None, base.threads) for i in range(n)]


@dataclass(frozen=True)
class RaySettings:
    """How the Ray launcher finds nodes and places roles (see deploy/ray/launcher.py)."""

    address: str | None = None
    """None: start a local Ray instance; else join it ("auto", "ray://…", "host:port")."""
    namespace: str = "pdserve"
    prefill_resource: str = "pdserve_prefill"
    """Custom node resource a prefill worker needs one unit of (e.g. cloud GPU nodes)."""
    decode_resource: str = "pdserve_decode"
    router_resource: str | None = None
    """None: the router runs next to the launcher (soft); else on a node with it."""
    prefill_gpus: float = 0.0
    """GPUs each prefill worker needs (0 = none)."""
    decode_gpus: float = 0.0
    max_restarts: int = 3
    """How often Ray restarts a worker whose process died."""

    def __post_init__(self) -> None:
        if self.max_restarts < -1:
            raise ValueError(f"ray.max_restarts must be >= -1, got {self.max_restarts}")
        if self.prefill_gpus < 0 or self.decode_gpus < 0:
            raise ValueError("ray.prefill_gpus and ray.decode_gpus must be >= 0")


@dataclass(frozen=True)
class ClusterConfig:
    model: str | None = None
    dtype: str = "bfloat16"
    kv_encoding: str = "model"
    host: str = "127.0.0.1"
    router_port: int = 50051
    http_port: int = 8000
    """The router's OpenAI-compatible HTTP port (0 = off)."""
    api_key: str | None = None
    """Bearer token the router requires (also $PDSERVE_API_KEY); None = open."""
    local_prefill_below: int = 16
    prefill_fallback: str = "local"
    """Decode workers, when a prefill worker is unreachable or dies mid-transfer:
    local (prefill the prompt themselves) or fail (UNAVAILABLE)."""
    launcher: str = "ray"
    pin: str = "auto"
    """auto: workers pin themselves (pdserve/placement.py); off: no pinning."""
    ray: RaySettings = RaySettings()
    prefill: list[Member] = field(default_factory=lambda: _default_members()[0])
    decode: list[Member] = field(default_factory=lambda: _default_members()[1])

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.kv_encoding not in KV_ENCODINGS:
            raise ValueError(f"kv_encoding must be one of {KV_ENCODINGS}, got {self.kv_encoding!r}")
        if self.launcher not in LAUNCHERS:
            raise ValueError(f"launcher must be one of {LAUNCHERS}, got {self.launcher!r}")
        if self.prefill_fallback not in PREFILL_FALLBACKS:
            raise ValueError(f"prefill_fallback must be one of {PREFILL_FALLBACKS}, "
                             f"got {self.prefill_fallback!r}")
        if self.pin not in PIN_MODES:
            raise ValueError(f"pin must be one of {PIN_MODES}, got {self.pin!r}")
        if not self.decode:
            raise ValueError("decode: at least one decode worker is required")
        if not 0 <= self.http_port < 65536:
            raise ValueError(f"http_port must be in [0, 65535], got {self.http_port!r}")
        if self.api_key is not None and not (isinstance(self.api_key, str) and self.api_key):
            raise ValueError("api_key must be a non-empty string or null")

    @classmethod
    def from_yaml(cls, path: str | Path) -> ClusterConfig:
        data: dict[str, Any] = yaml.safe_load(Path(path).read_text()) or {}
        known = set(cls.__dataclass_fields__)
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"cluster config: unknown keys {sorted(unknown)}; "
                             f"allowed: {sorted(known)}")
        for role in ("prefill", "decode"):
            if role in data:
                data[role] = [_member(role, i, m) for i, m in enumerate(data[role] or [])]
        if "ray" in data:
            ray = data["ray"] or {}
            allowed = set(RaySettings.__dataclass_fields__)
            if not isinstance(ray, dict) or set(ray) - allowed:
                raise ValueError(f"ray must be a mapping with keys among {sorted(allowed)}, "
                                 f"got {ray!r}")
            data["ray"] = RaySettings(**ray)
        return cls(**data)


def _member(role: str, i: int, m: dict[str, Any]) -> Member:
    allowed = {"port", "metrics_port", "cpus", "threads"}
    if not isinstance(m, dict) or "port" not in m or set(m) - allowed:
        raise ValueError(f"{role}[{i}] must be a mapping with port and optionally "
                         f"metrics_port, cpus, threads; got {m!r}")
    cpus = m.get("cpus")
    return Member(int(m["port"]), int(m.get("metrics_port", 0)),
                  tuple(cpus) if cpus is not None else None, m.get("threads"))


def worker_command(role: str, m: Member, c: ClusterConfig, slot: int, slots: int) -> list[str]:
    """The worker's command line; it is worker ``slot`` of ``slots`` on its machine."""
    cmd = [sys.executable, "-m", f"{role}_worker", "--host", c.host, "--port", str(m.port),
           "--metrics-port", str(m.metrics_port), "--dtype", c.dtype,
           "--kv-encoding", c.kv_encoding, "--pin", c.pin, "--slot", str(slot),
           "--slots", str(slots)]
    if role == "decode":
        cmd += ["--prefill-fallback", c.prefill_fallback]
    if c.model:
        cmd += ["--model", c.model]
    if m.cpus:
        cmd += ["--cpus", ",".join(map(str, m.cpus))]
    if m.threads:
        cmd += ["--threads", str(m.threads)]
    return cmd


def router_command(c: ClusterConfig, decode: list[str], prefill: list[str],
                   members_stdin: bool = False) -> list[str]:
    cmd = [sys.executable, "-m", "router", "--host", c.host, "--port", str(c.router_port),
           "--http-port", str(c.http_port), "--local-prefill-below", str(c.local_prefill_below)]
    cmd += [a for d in decode for a in ("--decode", d)]
    cmd += [a for p in prefill for a in ("--prefill", p)]
    if members_stdin:
        cmd.append("--members-stdin")
    if c.model:
        cmd += ["--model", c.model]
    return cmd


def router_env(c: ClusterConfig) -> dict[str, str]:
    """The key goes by environment, not argv: argv is visible to every user in `ps`."""
    return {"PDSERVE_API_KEY": c.api_key} if c.api_key else {}


def wait_serving(address: str, timeout: float, procs: Sequence[subprocess.Popen[Any]]) -> None:
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(address) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        while time.monotonic() < deadline:
            if any(p.poll() is not None for p in procs):
                raise RuntimeError(f"a cluster process exited while waiting for {address}")
            try:
                r = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1)
                if r.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.2)
    raise RuntimeError(f"{address} did not become SERVING within {timeout:.0f} s")


def start(c: ClusterConfig, timeout: float = 600) -> list[subprocess.Popen[bytes]]:
    """Start every member; return once all answer SERVING."""
    procs: list[subprocess.Popen[bytes]] = []
    try:
        workers = [("prefill", m) for m in c.prefill] + [("decode", m) for m in c.decode]
        for slot, (role, m) in enumerate(workers):
            procs.append(subprocess.Popen(worker_command(role, m, c, slot, len(workers))))
        for _, m in workers:
            wait_serving(f"{c.host}:{m.port}", timeout, procs)
        procs.append(subprocess.Popen(router_command(
            c, [f"{c.host}:{m.port}" for m in c.decode], [f"{c.host}:{m.port}" for m in c.prefill]),
            env={**os.environ, **router_env(c)}))
        wait_serving(f"{c.host}:{c.router_port}", 60, procs)
    except BaseException:
        stop(procs)
        raise
    return procs


def stop(procs: list[subprocess.Popen[bytes]], grace: float = 15) -> None:
    for p in reversed(procs):  # router first, so no new work reaches the workers
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def up(c: ClusterConfig) -> int:
    from pdserve.model_files import resolve_model

    if c.launcher == "ray":
        from deploy.ray.launcher import up as ray_up

        return ray_up(c)

    resolve_model(c.model)  # convert once, before three processes race to do it
    procs = start(c)
    http = (f"  router     http://{c.host}:{c.http_port}/v1 (OpenAI HTTP; /health, /metrics)\n"
            if c.http_port else "")
    print(f"\npdserve cluster up:\n  router     {c.host}:{c.router_port} (gRPC)\n" + http +
          "".join(f"  prefill    {c.host}:{m.port} metrics :{m.metrics_port} pid {p.pid}\n"
                  for m, p in zip(c.prefill, procs, strict=False)) +
          "".join(f"  decode     {c.host}:{m.port} metrics :{m.metrics_port} pid {p.pid}\n"
                  for m, p in zip(c.decode, procs[len(c.prefill):], strict=False)) +
          '\nTry:  .venv/bin/pdserve generate "What is the capital of France?" --chat\n'
          "Ctrl-C stops the cluster.", flush=True)
    interrupt_on_stop_signals()
    try:
        return watch(lambda: all(p.poll() is None for p in procs), 0.5,
                     "a cluster process exited; stopping")
    finally:
        stop(procs)


def interrupt_on_stop_signals() -> None:
    """Ctrl-C and SIGTERM both raise KeyboardInterrupt (a background shell ignores
    SIGINT unless we ask for it)."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)


def watch(alive: Callable[[], bool], interval_s: float, died: str) -> int:
    """Block while ``alive()``: 0 on Ctrl-C or SIGTERM, 1 (after printing ``died``)
    when the cluster broke on its own."""
    try:
        while alive():
            time.sleep(interval_s)
    except KeyboardInterrupt:
        return 0
    print(died, file=sys.stderr)
    return 1
