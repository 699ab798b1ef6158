"""Ray actors: the worker registry and the actor that owns one pdserve role's process.

Why a child process and not the server inside the actor: pinning must happen
before torch starts threads and applies to a whole process only when done from
its first thread (``sched_setaffinity`` on Linux pins one thread; a Ray worker
already runs dozens), ``/proc/PID/status`` then shows it from outside, and the
role keeps its own SIGTERM drain. The child runs exactly what ``python -m
prefill_worker`` / ``decode_worker`` / ``router`` run. It dies with its actor:
``PDSERVE_PARENT_PID`` makes it SIGTERM itself when the actor is gone; and the
actor dies with its child: an unexpected child exit (any exit code: a crash, a
worker whose engine died and exited 70, kill -9) ends the actor process, so Ray
restarts it (``max_restarts``, the router's too), its constructor starts a new
child on the same port, and a worker registers again (the router learns it through
the registry; a restarted router is fed the registry's membership). Once
``max_restarts`` is used up the actor stays dead: a worker is gone from the
registry, so the router stops routing to it; a dead router ends ``pdserve up``.

RoleProcess: STARTING (child loads; health polled) → SERVING (worker registered;
router fed membership) → STOPPING (``stop``: deregister, SIGTERM, SIGKILL after
the grace period) → STOPPED; or → CRASHED (child exited unasked: actor exits).
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import threading
import time
from typing import Any

import ray

from pdserve.config import TLSConfig
from pdserve.grpc_server import PARENT_ENV
from pdserve.launch import wait_serving

log = logging.getLogger("pdserve.ray")


def _stderr_path() -> str:
    """Where this actor's stderr goes, and so its child's log lines: Ray points it at
    the worker's ``.err`` file in the node's Ray log directory."""
    try:
        return os.readlink("/proc/self/fd/2")
    except OSError:
        return "the actor's stderr"


class Registry:
    """Worker name → where it serves. Named (``pdserve-registry``) in the cluster's
    namespace; owned by the launcher, so it ends with it."""

    def __init__(self) -> None:
        self._workers: dict[str, dict[str, Any]] = {}
        self._version = 0

    def register(self, name: str, info: dict[str, Any]) -> int:
        self._workers[name] = info
        self._version += 1
        return self._version

    def deregister(self, name: str, pid: int) -> None:
        """Only the registration of that very process: a restarted one keeps its own."""
        if self._workers.get(name, {}).get("pid") == pid:
            del self._workers[name]
            self._version += 1

    def members(self) -> dict[str, Any]:
        return {"version": self._version, "workers": dict(self._workers)}


class RoleProcess:
    """One router, prefill or decode process, started in ``__init__`` (also on a restart)."""

    def __init__(self, spec: dict[str, Any]) -> None:
        # The registry by name, not by handle: plain constructor arguments stay inline,
        # so Ray can always replay them on a restart.
        self.spec = spec
        self.registry: Any = ray.get_actor(spec["registry"])
        self.state = "STARTING"
        self.node_id = ray.get_runtime_context().get_node_id()
        host = spec["host"]
        self.ip = ray.util.get_node_ip_address() if host in ("0.0.0.0", "::", "") else host
        self.address = f"{self.ip}:{spec['port']}"
        is_router = spec["role"] == "router"
        env = {**os.environ, **spec.get("env", {}), PARENT_ENV: str(os.getpid())}
        self.proc = subprocess.Popen(spec["argv"], env=env,
                                     stdin=subprocess.PIPE if is_router else subprocess.DEVNULL,
                                     text=True)
        if is_router:  # before waiting: the router serves once it knows a decode worker
            threading.Thread(target=self._feed_members, name="members", daemon=True).start()
        probe = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
        tls = TLSConfig(**spec["tls"]) if spec.get("tls") else None  # the launcher's client cert
        wait_serving(f"{probe}:{spec['port']}", spec.get("timeout", 600), [self.proc], tls)
        if not is_router:
            ray.get(self.registry.register.remote(spec["name"], self.info()))
        threading.Thread(target=self._supervise, name="supervise", daemon=True).start()
        self.state = "SERVING"

    def info(self) -> dict[str, Any]:
        return {"name": self.spec["name"], "role": self.spec["role"], "address": self.address,
                "pid": self.proc.pid, "node_id": self.node_id, "ip": self.ip,
                "state": self.state, "log": _stderr_path(),
                "actor_id": ray.get_runtime_context().get_actor_id()}

    def stop(self, grace: float = 15.0) -> None:
        self.state = "STOPPING"
        if self.spec["role"] != "router":
            try:
                ray.get(self.registry.deregister.remote(self.spec["name"], self.proc.pid),
                        timeout=5)
            except Exception:  # the registry may be gone already
                pass
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            self.proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.state = "STOPPED"

    def _supervise(self) -> None:
        code = self.proc.wait()
        if self.state in ("STOPPING", "STOPPED"):
            return
        self.state = "CRASHED"
        log.error("%s process %d exited with %s; ending the actor so Ray restarts it",
                  self.spec["name"], self.proc.pid, code)
        try:
            ray.get(self.registry.deregister.remote(self.spec["name"], self.proc.pid), timeout=5)
        finally:
            os._exit(1)

    def _feed_members(self) -> None:
        """Router only: write the registry's membership to the router's stdin on change."""
        last = None
        while self.state != "STOPPING" and self.proc.poll() is None:
            try:
                members: dict[str, Any] = ray.get(self.registry.members.remote(), timeout=5)
                workers = members["workers"].values()
                line = json.dumps({r: sorted(w["address"] for w in workers if w["role"] == r)
                                   for r in ("decode", "prefill")})
                if line != last:
                    assert self.proc.stdin is not None
                    self.proc.stdin.write(line + "\n")
                    self.proc.stdin.flush()
                    last = line
            except Exception as e:  # registry restarting, router exiting: retry shortly
                log.warning("membership feed: %s", e)
            time.sleep(0.5)
