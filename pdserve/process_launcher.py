"""``launcher: process``: router, prefill and decode workers as plain child processes
on this machine (Kubernetes pods, or no Ray).

STARTING (workers load; health polled) → SERVING (endpoints printed) → STOPPING
(Ctrl-C or SIGTERM: every child gets SIGTERM, router first, then SIGKILL after a
grace period) → STOPPED.

Each worker is started with the WorkerConfig the cluster config implies, turned
into argv by pdserve/worker_args.py. Every role logs to the launcher's stderr,
or to ``LOG_DIR/<role>.log`` when ``start`` is given a log directory.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from contextlib import ExitStack
from pathlib import Path

from pdserve.cluster_config import ClusterConfig
from pdserve.launch import (
    interrupt_on_stop_signals,
    role_env,
    router_command,
    wait_serving,
    watch,
)
from pdserve.worker_args import worker_command

Procs = list[subprocess.Popen[bytes]]


def start(c: ClusterConfig, timeout: float = 600, log_dir: Path | None = None) -> Procs:
    """Start every member; return once all answer SERVING."""
    procs: Procs = []
    with ExitStack() as files:  # the children hold their own copies of the log files

        def spawn(name: str, argv: list[str], env: dict[str, str]) -> None:
            err = files.enter_context(open(log_dir / f"{name}.log", "ab")) if log_dir else None
            procs.append(subprocess.Popen(argv, env={**os.environ, **env}, stderr=err))

        try:
            members = c.members()
            for slot, (role, m) in enumerate(members):
                worker = c.worker(role, m, slot, len(members))
                spawn(f"{role}-{slot}", worker_command(worker), role_env())
            for _, m in members:
                wait_serving(f"{c.host}:{m.port}", timeout, procs, c.tls("client"))
            router = c.router([f"{c.host}:{m.port}" for m in c.decode],
                              [f"{c.host}:{m.port}" for m in c.prefill])
            spawn("router", router_command(router), role_env(router.api_key))
            wait_serving(f"{c.host}:{c.router_port}", 60, procs, c.tls("client"))
        except BaseException:
            stop(procs)
            raise
    return procs


def stop(procs: Procs, grace: float = 15) -> None:
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


def banner(c: ClusterConfig, procs: Procs) -> str:
    scheme = "https" if c.certs else "http"
    http = (f"  router     {scheme}://{c.host}:{c.http_port}/v1 (OpenAI HTTP; /health, /metrics)\n"
            if c.http_port else "")
    tls = (f"  mTLS       every hop, certificates in {c.certs} (clients: pdserve generate "
           f"--tls-ca {c.certs}/ca.pem --tls-cert {c.certs}/client.pem "
           f"--tls-key {c.certs}/client-key.pem)\n" if c.certs else "")
    return (f"\npdserve cluster up:\n  router     {c.host}:{c.router_port} (gRPC)\n" + http +
            "".join(f"  prefill    {c.host}:{m.port} metrics :{m.metrics_port} pid {p.pid}\n"
                    for m, p in zip(c.prefill, procs, strict=False)) +
            "".join(f"  decode     {c.host}:{m.port} metrics :{m.metrics_port} pid {p.pid}\n"
                    for m, p in zip(c.decode, procs[len(c.prefill):], strict=False)) +
            tls + "  logs       every role logs to this terminal's stderr (role in each line)\n"
            '\nTry:  .venv/bin/pdserve generate "What is the capital of France?" --chat\n'
            "Ctrl-C stops the cluster.")


def up(c: ClusterConfig) -> int:
    """Run the cluster until Ctrl-C or SIGTERM; 1 if a process died on its own."""
    from pdserve.model_files import resolve_model

    resolve_model(c.model)  # convert once, before three processes race to do it
    procs = start(c)
    print(banner(c, procs), flush=True)
    interrupt_on_stop_signals()
    try:
        return watch(lambda: all(p.poll() is None for p in procs), 0.5,
                     "a cluster process exited; stopping")
    finally:
        stop(procs)
