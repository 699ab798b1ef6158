"""The router process: ``python -m router --decode ADDR --prefill ADDR`` (static
membership) or ``python -m router --members-stdin`` (updates from its owner, see
router/membership.py).

STARTING (gRPC and HTTP bound; health NOT_SERVING) → SERVING (at least one decode
worker answers its health probe) ⇄ NOT_SERVING (none does; requests get
UNAVAILABLE / 503) → DRAINING (SIGTERM or SIGINT: health NOT_SERVING, new
requests refused, in-flight ones finish within the grace period) → STOPPED.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import time
from dataclasses import dataclass

from pdserve import logs
from pdserve._proto.pdserve.v1 import api_pb2_grpc
from pdserve.grpc_server import Server, exit_with_parent, until_stop_signal
from pdserve.metrics import RouterMetrics
from pdserve.model_files import resolve_model
from router.auth import ApiKey, ApiKeyInterceptor
from router.decode_client import DecodeClients
from router.generation import Generator
from router.health import DecodeHealth
from router.membership import follow
from router.openai_http import OpenAIServer
from router.policy import LoadAwarePolicy, Member
from router.servicer import RouterServicer
from router.tokenizer import RouterTokenizer

log = logging.getLogger("pdserve.router")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m router")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=50051, help="gRPC port")
    p.add_argument("--http-port", type=int, default=8000,
                   help="OpenAI-compatible HTTP port, also /health and /metrics (0 = off)")
    p.add_argument("--model", default=None, help="HF directory or .gguf (default: SmolLM2)")
    p.add_argument("--served-model-name", default=None,
                   help="the model's name in the API (default: its directory's name)")
    p.add_argument("--decode", action="append", default=[], help="decode worker host:port")
    p.add_argument("--prefill", action="append", default=[], help="prefill worker host:port")
    p.add_argument("--local-prefill-below", type=int, default=16,
                   help="prompts shorter than this are prefilled on the decode worker")
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--api-key", default=os.environ.get("PDSERVE_API_KEY") or None,
                   help="require 'Authorization: Bearer KEY' (default: $PDSERVE_API_KEY)")
    p.add_argument("--health-interval", type=float, default=1.0,
                   help="seconds between decode worker health probes")
    p.add_argument("--drain-grace", type=float, default=10.0,
                   help="seconds in-flight requests get to finish on SIGTERM")
    p.add_argument("--members-stdin", action="store_true",
                   help="read membership updates (JSON lines) from stdin, see router/membership.py")
    a = p.parse_args(argv)
    if not a.decode and not a.members_stdin:
        p.error("--decode: at least one decode worker address is required")
    if not 0 <= a.http_port < 65536:
        p.error(f"--http-port must be in [0, 65535], got {a.http_port}")
    return a


@dataclass
class Router:
    grpc: Server
    http: OpenAIServer | None
    generator: Generator
    health: DecodeHealth

    @property
    def serving(self) -> bool:
        return self.health.usable and not self.generator.draining

    async def drain(self, grace_s: float) -> None:
        """Health NOT_SERVING, refuse new work, let in-flight requests finish, stop."""
        self.generator.draining = True
        await self.grpc.set_serving(False)
        log.info("draining: %d requests in flight", self.generator.running)
        deadline = time.monotonic() + grace_s
        while self.generator.running and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        await self.health.stop()
        if self.http is not None:
            await self.http.stop()
        await self.grpc.stop(grace=0.5)
        await self.generator.decode.close()


async def start_router(a: argparse.Namespace) -> Router:
    model_dir = resolve_model(a.model, convert=False)
    config = json.loads((model_dir / "config.json").read_text())
    max_len = a.max_model_len or int(config.get("max_position_embeddings", 2048))
    model_id = a.served_model_name or model_dir.name
    policy = LoadAwarePolicy([Member(x) for x in a.decode], [Member(x) for x in a.prefill],
                             a.local_prefill_below)
    key = ApiKey(a.api_key) if a.api_key else None
    server = Server(a.host, a.port, ["pdserve.v1.Generation"],
                    [ApiKeyInterceptor(key)] if key else [])
    metrics = RouterMetrics(model_id)
    decode = DecodeClients()

    async def on_change(usable: bool) -> None:
        if not generator.draining:
            await server.set_serving(usable)

    health = DecodeHealth(a.decode, decode, on_change, a.health_interval)
    generator = Generator(model_id, RouterTokenizer(model_dir), policy, max_len, decode,
                          metrics, health)
    api_pb2_grpc.add_GenerationServicer_to_server(RouterServicer(generator), server.server)
    await server.start()
    await server.set_serving(False)
    router = Router(server, None, generator, health)
    if a.http_port:
        router.http = OpenAIServer(generator, metrics.registry, key, lambda: router.serving)
        await router.http.start(a.host, a.http_port, a.drain_grace)
    await health.probe_all()
    health.start()
    return router


async def serve(a: argparse.Namespace) -> None:
    router = await start_router(a)
    follower = None
    if a.members_stdin:
        follower = asyncio.create_task(follow(router.generator.policy, sys.stdin.readline,
                                              router.health.set_addresses))
    http = f", HTTP on http://{a.host}:{router.http.port}" if router.http else ""
    print(f"router serving gRPC on {a.host}:{router.grpc.port}{http}", flush=True)
    await until_stop_signal()
    if follower is not None:
        follower.cancel()
    await router.drain(a.drain_grace)


def main(argv: list[str] | None = None) -> int:
    log_format, argv = logs.split_format_flag(argv)  # --log-format {auto,json,text}
    logs.configure("router", fmt=log_format)
    exit_with_parent()
    try:
        asyncio.run(serve(parse_args(argv)))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
