"""The chaos cluster: router, prefill worker, decode workers and hostile prefill peers
as real processes on free ports, each of which the harness can kill, stop, resume
and restart.

It is the process launcher's cluster (the same worker argv from
pdserve/worker_args.py, the same router argv from pdserve/launch.py), started here
rather than by ``pdserve up --launcher process`` because the harness owns each
process: it sends the signals, restarts what it killed on the same port, and puts
hostile peers into the router's prefill pool ahead of the real worker (the load-aware
policy breaks ties by list order, so an idle cluster sends a remote prefill to the
first hostile peer).

Each process: DOWN → STARTING (spawned; logs JSON lines to ``LOG_DIR/NAME.log``) →
SERVING (its health says so) ⇄ STOPPED (SIGSTOP / SIGCONT) → DEAD (SIGKILL, or it
exited) → STARTING again on ``restart``; ``close`` ends them all (router first).
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field, replace
from pathlib import Path

import psutil

from pdserve.config import RouterConfig
from pdserve.launch import role_env, router_command, wait_serving
from pdserve.logs import FORMAT_ENV
from pdserve.worker_args import worker_command, worker_config

HOST = "127.0.0.1"
_RID = re.compile(r'"request_id": "([^"]+)"')
_BLOCKS = re.compile(r"kv_blocks=(\d+)")


def free_port() -> int:
    """A free port below the ephemeral range: a worker binds its ports only after its
    model loaded (a minute on a busy box), and ports the kernel hands out for port 0
    and for outgoing connections could be taken by then."""
    while True:
        port = random.randrange(20000, 32000)
        with socket.socket() as s:
            try:
                s.bind((HOST, port))
            except OSError:
                continue
            return port


@dataclass
class Proc:
    """One process of the cluster and how to start it again."""

    name: str
    role: str  # router | prefill | decode | hostile
    argv: list[str]
    port: int
    metrics_port: int = 0
    env: dict[str, str] = field(default_factory=dict)
    popen: subprocess.Popen[bytes] | None = None
    starts: int = 0

    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"

    @property
    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid


@dataclass(frozen=True)
class ClusterSpec:
    model: str
    dtype: str = "float32"
    decode_workers: int = 2
    hostile_peers: int = 1
    kv_cache_gb: float = 0.25
    local_prefill_below: int = 16
    threads: int = 1
    vocab_size: int = 0  # 0: read from the model's config.json
    http: bool = True
    sweep_router: bool = True
    """A second router whose only prefill worker is hostile peer 0 (the hostile sweep)."""


class ChaosCluster:
    def __init__(self, spec: ClusterSpec, log_dir: Path) -> None:
        self.spec, self.log_dir = spec, log_dir
        log_dir.mkdir(parents=True, exist_ok=True)
        self.procs: dict[str, Proc] = {}
        self.http_port = free_port() if spec.http else 0
        self.vocab_size = spec.vocab_size or _vocab_size(spec.model)
        self._plan()

    # -- building ----------------------------------------------------------------------

    def _plan(self) -> None:
        """Every port first: decode workers may be told which prefill peers to dial."""
        self._worker("prefill-0", "prefill")
        upstream = self.procs["prefill-0"].address
        for i in range(self.spec.hostile_peers):
            port = free_port()
            argv = [sys.executable, "-m", "bench.chaos.hostile_prefill", "--upstream", upstream,
                    "--vocab-size", str(self.vocab_size), "--port", str(port),
                    "--log", str(self.log_dir / f"hostile-{i}.jsonl")]
            self.procs[f"hostile-{i}"] = Proc(f"hostile-{i}", "hostile", argv, port)
        for i in range(self.spec.decode_workers):
            self._worker(f"decode-{i}", "decode")
        prefill = [p.address for p in self.of_role("hostile")] + [upstream]
        router = RouterConfig(host=HOST, port=free_port(), http_port=self.http_port,
                              model=self.spec.model,
                              decode=tuple(p.address for p in self.of_role("decode")),
                              prefill=tuple(prefill),
                              policy="load_aware",  # hostile peers first, as said above
                              local_prefill_below=self.spec.local_prefill_below)
        self.procs["router"] = Proc("router", "router", router_command(router), router.port,
                                    env=role_env())
        if self.spec.sweep_router and self.spec.hostile_peers:
            sweep = replace(router, port=free_port(), http_port=0,
                            prefill=(self.procs["hostile-0"].address,))
            self.procs["router-hostile"] = Proc("router-hostile", "router",
                                                router_command(sweep), sweep.port, env=role_env())

    def _worker(self, name: str, role: str) -> None:
        port, metrics_port = free_port(), free_port()
        cfg = worker_config(role, host=HOST, port=port, metrics_port=metrics_port,
                            model=self.spec.model, dtype=self.spec.dtype,
                            threads=self.spec.threads, pin="off",
                            kv_cache_gb=self.spec.kv_cache_gb,
                            # tight, as under an SLA: a wedged peer costs 3 x 2 s at most
                            kv_idle_timeout_s=2.0)
        self.procs[name] = Proc(name, role, worker_command(cfg), port, metrics_port,
                                env=role_env())

    def of_role(self, role: str) -> list[Proc]:
        return [p for p in self.procs.values() if p.role == role]

    @property
    def router_address(self) -> str:
        return self.procs["router"].address

    @property
    def http_url(self) -> str:
        return f"http://{HOST}:{self.http_port}"

    # -- lifecycle ---------------------------------------------------------------------

    def start(self, timeout: float = 300, attempts: int = 2) -> None:
        """Workers and peers first, then the routers; each answers SERVING. A process
        that exits while starting (a port taken meanwhile) starts the cluster over on
        new ports."""
        for attempt in range(attempts):
            try:
                return self._start_once(timeout)
            except RuntimeError:
                if attempt + 1 == attempts:
                    raise
                self.procs = {}
                self._plan()

    def _start_once(self, timeout: float) -> None:
        try:
            for p in self.procs.values():
                if p.role != "router":
                    self.spawn(p.name)
            for p in self.procs.values():
                if p.role != "router":
                    self.wait_serving(p.name, timeout)
            for p in self.of_role("router"):
                self.spawn(p.name)
            for p in self.of_role("router"):
                self.wait_serving(p.name, 120)
        except BaseException:
            self.close()
            raise

    def spawn(self, name: str) -> None:
        p = self.procs[name]
        env = {**os.environ, **p.env, FORMAT_ENV: "json"}
        with open(self.log_dir / f"{name}.log", "ab") as err:
            p.popen = subprocess.Popen(p.argv, env=env, stderr=err, stdout=subprocess.DEVNULL)
        p.starts += 1

    def wait_serving(self, name: str, timeout: float) -> None:
        p = self.procs[name]
        assert p.popen is not None
        wait_serving(p.address, timeout, [p.popen])

    def kill9(self, name: str) -> None:
        self.procs[name].popen.send_signal(signal.SIGKILL)  # type: ignore[union-attr]
        self.procs[name].popen.wait()  # type: ignore[union-attr]

    def sigstop(self, name: str) -> None:
        self.procs[name].popen.send_signal(signal.SIGSTOP)  # type: ignore[union-attr]

    def sigcont(self, name: str) -> None:
        self.procs[name].popen.send_signal(signal.SIGCONT)  # type: ignore[union-attr]

    def restart(self, name: str) -> None:
        """Start a dead process again, same argv, same port."""
        if not self.procs[name].alive:
            self.spawn(name)

    def close(self, grace: float = 10) -> None:
        order = sorted(self.procs, key=lambda n: self.procs[n].role != "router")
        for n in order:
            p = self.procs[n]
            if p.alive:
                assert p.popen is not None
                p.popen.send_signal(signal.SIGCONT)
                p.popen.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace
        for n in order:
            popen = self.procs[n].popen
            if popen is None:
                continue
            try:
                popen.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                popen.kill()
                popen.wait()

    # -- what the checker reads ----------------------------------------------------------

    def metrics(self, name: str) -> dict[str, float]:
        """A worker's Prometheus gauges and counters, summed over labels."""
        port = self.procs[name].metrics_port
        body = urllib.request.urlopen(f"http://{HOST}:{port}/metrics", timeout=5).read()
        out: dict[str, float] = {}
        for line in body.decode().splitlines():
            if line.startswith("pdserve:"):
                key = line.split("{", 1)[0].split(" ", 1)[0]
                out[key] = out.get(key, 0.0) + float(line.rsplit(" ", 1)[1])
        return out

    def kv_blocks(self, name: str) -> int:
        """The size of a worker's KV pool, from its 'engine ready' log line."""
        found = _BLOCKS.findall((self.log_dir / f"{name}.log").read_text(errors="replace"))
        return int(found[-1]) if found else 0

    def rss(self) -> dict[str, int]:
        """Resident bytes of every live process."""
        out = {}
        for p in self.procs.values():
            if p.alive:
                try:
                    out[p.name] = int(psutil.Process(p.pid).memory_info().rss)
                except psutil.NoSuchProcess:
                    pass
        return out

    def request_ids_seen(self, name: str) -> set[str]:
        """Request ids a process logged (workers: JSON logs; hostile peers: their log)."""
        path = self.log_dir / (f"{name}.jsonl" if self.procs[name].role == "hostile"
                               else f"{name}.log")
        if not path.exists():
            return set()
        return set(_RID.findall(path.read_text(errors="replace")))

    def hostile_hits(self) -> dict[str, str]:
        """request id → mode, for every request a hostile peer received."""
        out: dict[str, str] = {}
        for p in self.of_role("hostile"):
            path = self.log_dir / f"{p.name}.jsonl"
            if path.exists():
                for line in path.read_text().splitlines():
                    rec = json.loads(line)
                    out[rec["request_id"]] = rec["mode"]
        return out


def _vocab_size(model: str) -> int:
    from pdserve.model_files import resolve_model

    cfg = json.loads((Path(resolve_model(model)) / "config.json").read_text())
    return int(cfg["vocab_size"])
