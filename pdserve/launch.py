"""What every launcher shares: each role's command line and environment, waiting
for a role to answer SERVING (over mTLS with the launcher's client certificate when
the cluster has ``certs``), and holding the cluster up until Ctrl-C or SIGTERM.

Workers get their argv from pdserve/worker_args.py (the inverse of their own
parser); the router's comes from its RouterConfig here. Children inherit
``$PDSERVE_LOG_FORMAT`` (``pdserve up --log-format``) through ``role_env``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pdserve.config import RouterConfig, TLSConfig
from pdserve.logs import FORMAT_ENV
from pdserve.tls import channel


def router_command(r: RouterConfig) -> list[str]:
    """``python -m router`` for ``r``; the API key goes by ``role_env``, not argv."""
    cmd = [sys.executable, "-m", "router", "--host", r.host, "--port", str(r.port),
           "--http-port", str(r.http_port), "--policy", r.policy,
           "--local-prefill-below", str(r.local_prefill_below),
           "--local-prefill-stall-s", repr(r.local_prefill_stall_s),
           "--state-interval", repr(r.state_interval_s)]
    if not r.migration:
        cmd.append("--no-migration")
    if r.kv_encodings:
        cmd += ["--kv-encodings", ",".join(r.kv_encodings)]
    cmd += [a for d in r.decode for a in ("--decode", d)]
    cmd += [a for p in r.prefill for a in ("--prefill", p)]
    if r.members_stdin:
        cmd.append("--members-stdin")
    if r.model:
        cmd += ["--model", r.model]
    return cmd + _router_tls_argv(r)


def _router_tls_argv(r: RouterConfig) -> list[str]:
    argv: list[str] = []
    if r.tls is not None:
        for flag, path in (("--tls-ca", r.tls.ca), ("--tls-cert", r.tls.cert),
                           ("--tls-key", r.tls.key)):
            argv += [flag, str(path)]
        if r.tls.require_client_cert:
            argv.append("--tls-require-client-cert")
    if r.health_port:
        argv += ["--health-port", str(r.health_port)]
    return argv


def role_env(api_key: str | None = None) -> dict[str, str]:
    """What a role's process gets beyond the launcher's environment. The key goes by
    environment, not argv: argv is visible to every user in `ps`."""
    env = {FORMAT_ENV: os.environ[FORMAT_ENV]} if os.environ.get(FORMAT_ENV) else {}
    return {**env, "PDSERVE_API_KEY": api_key} if api_key else env


def wait_serving(address: str, timeout: float, procs: Sequence[subprocess.Popen[Any]],
                 tls: TLSConfig | None = None) -> None:
    """Poll ``address``'s grpc.health.v1 until SERVING; RuntimeError when one of
    ``procs`` exits first or ``timeout`` passes. ``tls``: the launcher's client
    certificate, for roles that serve mTLS."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(p.poll() is not None for p in procs):
            raise RuntimeError(f"a cluster process exited while waiting for {address}")
        if probe_serving(address, tls=tls):
            return
        time.sleep(0.2)
    raise RuntimeError(f"{address} did not become SERVING within {timeout:.0f} s")


def probe_serving(address: str, timeout: float = 1.0, tls: TLSConfig | None = None) -> bool:
    """One grpc.health.v1 check of ``address`` on a fresh channel (a long-lived one
    would wait out its reconnect backoff after the process behind it restarted);
    ``tls``: the prober's client certificate, for roles that serve mTLS."""
    with channel(address, tls) as ch:
        try:
            r = health_pb2_grpc.HealthStub(ch).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=timeout)
        except grpc.RpcError:
            return False
    return bool(r.status == health_pb2.HealthCheckResponse.SERVING)


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
