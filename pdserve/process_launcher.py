"""``launcher: process``: router, prefill and decode workers as plain child processes
on this machine (Kubernetes pods, or no Ray), kept running by pdserve/supervisor.py.

STARTING (workers load; health polled; one that exits here fails the start) →
SERVING (endpoints printed; a process that exits — a crash, an engine that died,
kill -9 — is restarted on its own port after a backoff, router included, until it
crashed too often: then it is given up, logged, and the rest stays up) → STOPPING
(Ctrl-C or SIGTERM: no more restarts; every child gets SIGTERM, router first, then
SIGKILL after a grace period) → STOPPED. ``up`` ends by itself only when the router
was given up (exit 1).

Each worker is started with the WorkerConfig the cluster config implies, turned
into argv by pdserve/worker_args.py. Every role logs to the launcher's stderr,
or to ``LOG_DIR/<role>.log`` when ``start`` is given a log directory.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

from pdserve.cluster_config import ClusterConfig
from pdserve.config import RestartPolicy, TLSConfig
from pdserve.grpc_server import PARENT_ENV
from pdserve.launch import (
    interrupt_on_stop_signals,
    probe_serving,
    role_env,
    router_command,
    watch,
)
from pdserve.supervisor import DEFAULT_POLICY, ChildSpec, Supervisor
from pdserve.worker_args import worker_command


def _spec(name: str, argv: list[str], env: dict[str, str], address: str,
          log_dir: Path | None, tls: TLSConfig | None) -> ChildSpec:
    # PARENT_ENV: a launcher that is killed outright takes its children with it
    # (they drain and exit) instead of leaving them holding the ports.
    return ChildSpec(name, argv, {**env, PARENT_ENV: str(os.getpid())},
                     functools.partial(probe_serving, address, tls=tls),
                     log_dir / f"{name}.log" if log_dir else None)


def start(c: ClusterConfig, timeout: float = 600, log_dir: Path | None = None,
          restart: RestartPolicy = DEFAULT_POLICY) -> Supervisor:
    """Start every member; return once all answer SERVING, supervised from then on."""
    supervisor = Supervisor(restart)
    try:
        members = c.members()
        for slot, (role, m) in enumerate(members):
            worker = c.worker(role, m, slot, len(members))
            supervisor.add(_spec(f"{role}-{slot}", worker_command(worker), role_env(),
                                 f"{c.host}:{m.port}", log_dir, c.tls("client")))
        supervisor.wait_running(timeout)
        router = c.router([f"{c.host}:{m.port}" for m in c.decode],
                          [f"{c.host}:{m.port}" for m in c.prefill])
        supervisor.add(_spec("router", router_command(router), role_env(router.api_key),
                             f"{c.host}:{c.router_port}", log_dir, c.tls("client")))
        supervisor.wait_running(60)
    except BaseException:
        supervisor.stop()
        raise
    supervisor.run_in_background()
    return supervisor


def stop(supervisor: Supervisor, grace: float = 15) -> None:
    supervisor.stop(grace)


def banner(c: ClusterConfig, supervisor: Supervisor) -> str:
    pids = [ch.proc.pid if ch.proc else 0 for ch in supervisor.children]
    scheme = "https" if c.certs else "http"
    http = (f"  router     {scheme}://{c.host}:{c.http_port}/v1 (OpenAI HTTP; /health, /metrics)\n"
            if c.http_port else "")
    tls = (f"  mTLS       every hop, certificates in {c.certs} (clients: pdserve generate "
           f"--tls-ca {c.certs}/ca.pem --tls-cert {c.certs}/client.pem "
           f"--tls-key {c.certs}/client-key.pem)\n" if c.certs else "")
    return (f"\npdserve cluster up:\n  router     {c.host}:{c.router_port} (gRPC)\n" + http +
            "".join(f"  prefill    {c.host}:{m.port} metrics :{m.metrics_port} pid {p}\n"
                    for m, p in zip(c.prefill, pids, strict=False)) +
            "".join(f"  decode     {c.host}:{m.port} metrics :{m.metrics_port} pid {p}\n"
                    for m, p in zip(c.decode, pids[len(c.prefill):], strict=False)) +
            tls + "  logs       every role logs to this terminal's stderr (role in each line)\n"
            "  restarts   a process that exits is restarted (backoff 1 s doubling to 30 s)\n"
            '\nTry:  .venv/bin/pdserve generate "What is the capital of France?" --chat\n'
            "Ctrl-C stops the cluster.")


def up(c: ClusterConfig) -> int:
    """Run the cluster until Ctrl-C or SIGTERM; 1 if the router had to be given up."""
    from pdserve.model_files import resolve_model

    resolve_model(c.model)  # convert once, before three processes race to do it
    supervisor = start(c)
    print(banner(c, supervisor), flush=True)
    interrupt_on_stop_signals()
    try:
        return watch(lambda: not supervisor.gave_up("router"), 0.5,
                     "the router kept crashing; stopping")
    finally:
        stop(supervisor)
