"""One way to build every role's gRPC server: health, reflection, message limits,
TLS (pdserve/tls.py) and an optional plaintext port for health probes alone."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from collections.abc import Sequence

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from pdserve import tls as tls_credentials
from pdserve.config import TLSConfig

MAX_MESSAGE_BYTES = 64 * 1024 * 1024  # KV chunks stay far below; prompts of token ids too
OPTIONS = [("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
           ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
           # Channels: redial a peer that went away at least every 5 s (gRPC's default
           # backoff grows to 120 s), so a restarted worker is seen within seconds.
           ("grpc.initial_reconnect_backoff_ms", 1000),
           ("grpc.max_reconnect_backoff_ms", 5000)]
# SERVING from start until the process ends: what a liveness probe asks where "" means
# "can serve now" and may rightly be NOT_SERVING for long (a router with no decode
# worker up: restarting it would not help).
LIVENESS_SERVICE = "liveness"


# No SO_REUSEPORT: a second server on a busy port must fail, not share it.
_SERVER_OPTIONS = [*OPTIONS, ("grpc.so_reuseport", 0)]


class Server:
    """``tls`` set: the port serves TLS only (client certificates per
    ``tls.require_client_cert``). ``health_port``: a second server, plaintext, with
    grpc.health.v1 alone (the same statuses), because kubelet's gRPC probes speak no
    TLS; nothing else is reachable there."""

    def __init__(self, host: str, port: int, service_names: list[str],
                 interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
                 tls: TLSConfig | None = None, health_port: int = 0) -> None:
        self.server = grpc.aio.server(options=_SERVER_OPTIONS, interceptors=list(interceptors))
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self.service_names = service_names
        reflection.enable_server_reflection(
            [*service_names, health.SERVICE_NAME, reflection.SERVICE_NAME], self.server)
        self.port = tls_credentials.add_port(self.server, f"{host}:{port}", tls)
        self.health_server: grpc.aio.Server | None = None
        self.health_port = 0
        if health_port:
            self.health_server = grpc.aio.server(options=_SERVER_OPTIONS)
            health_pb2_grpc.add_HealthServicer_to_server(self.health, self.health_server)
            self.health_port = self.health_server.add_insecure_port(f"{host}:{health_port}")

    async def start(self) -> None:
        await self.server.start()
        await self.health.set(LIVENESS_SERVICE, health_pb2.HealthCheckResponse.SERVING)
        if self.health_server is not None:
            await self.health_server.start()

    async def set_serving(self, serving: bool) -> None:
        status = (health_pb2.HealthCheckResponse.SERVING if serving
                  else health_pb2.HealthCheckResponse.NOT_SERVING)
        for name in ["", *self.service_names]:
            await self.health.set(name, status)

    async def stop(self, grace: float = 5.0) -> None:
        await self.set_serving(False)
        await self.server.stop(grace)
        if self.health_server is not None:
            await self.health_server.stop(0)


async def until_stop_signal() -> None:
    """Return on SIGTERM or SIGINT: the moment a role starts draining."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


PARENT_ENV = "PDSERVE_PARENT_PID"


def exit_with_parent() -> None:
    """When ``PDSERVE_PARENT_PID`` names our parent (a Ray actor that owns this
    process), SIGTERM ourselves once that parent is gone: a draining exit when the
    role is serving, the default (immediate) one while it still loads. A thread
    polls because PR_SET_PDEATHSIG fires on the death of the forking *thread*."""
    parent = int(os.environ.get(PARENT_ENV, "0") or 0)
    if parent <= 0:
        return

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()
