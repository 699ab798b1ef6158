"""The router process: ``python -m router --decode ADDR --prefill ADDR`` (static
membership) or ``python -m router --members-stdin`` (updates from its owner, see
router/membership.py). The command line is parsed into a ``RouterConfig``
(pdserve/config.py), which holds every default; ``start_router`` takes that.

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
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from pdserve import logs
from pdserve._proto.pdserve.v1 import api_pb2_grpc
from pdserve.config import ROUTING_POLICIES, RouterConfig, tls_from_args
from pdserve.grpc_server import Server, exit_with_parent, until_stop_signal
from pdserve.metrics import RouterMetrics
from pdserve.model_files import resolve_model
from pdserve.tls import server_ssl_context
from router.auth import ApiKey, ApiKeyInterceptor
from router.decode_client import DecodeClients
from router.generation import Generator
from router.health import DecodeHealth
from router.membership import follow
from router.openai_http import OpenAIServer
from router.policy import PolicyInputs, make_policy
from router.servicer import RouterServicer
from router.tokenizer import RouterTokenizer
from router.worker_loads import WorkerLoads

log = logging.getLogger("pdserve.router")
_DEFAULT = RouterConfig  # every CLI default is the config's own, written once there


def parse_args(argv: list[str] | None = None) -> RouterConfig:
    p = argparse.ArgumentParser(prog="python -m router")
    p.add_argument("--host", default=_DEFAULT.host)
    p.add_argument("--port", type=int, default=_DEFAULT.port, help="gRPC port")
    p.add_argument("--http-port", type=int, default=_DEFAULT.http_port,
                   help="OpenAI-compatible HTTP port, also /health and /metrics (0 = off)")
    p.add_argument("--model", default=_DEFAULT.model,
                   help="HF directory or .gguf (default: SmolLM2)")
    p.add_argument("--served-model-name", default=_DEFAULT.served_model_name,
                   help="the model's name in the API (default: its directory's name)")
    p.add_argument("--decode", action="append", default=list(_DEFAULT.decode),
                   help="decode worker host:port")
    p.add_argument("--prefill", action="append", default=list(_DEFAULT.prefill),
                   help="prefill worker host:port")
    p.add_argument("--policy", choices=ROUTING_POLICIES, default=_DEFAULT.policy,
                   help="routing policy: cost_model (by predicted TTFT from the workers' live "
                        "state) or load_aware (in-flight counts, static plan)")
    p.add_argument("--local-prefill-below", type=int, default=_DEFAULT.local_prefill_below,
                   help="prompts shorter than this are prefilled on the decode worker")
    p.add_argument("--local-prefill-stall-s", type=float,
                   default=_DEFAULT.local_prefill_stall_s,
                   help="cost_model: longest stall a local prefill may add to a decode "
                        "worker's running requests")
    p.add_argument("--state-interval", type=float, default=_DEFAULT.state_interval_s,
                   help="seconds between polls of every worker's live state")
    p.add_argument("--kv-encodings", default=",".join(_DEFAULT.kv_encodings),
                   help="cost_model: KV wire encodings it may ask for instead of the decode "
                        "worker's default where that brings the first token sooner, "
                        "comma-separated (int8: quantize KV on slow links; lossy)")
    p.add_argument("--max-model-len", type=int, default=_DEFAULT.max_model_len)
    p.add_argument("--max-prompt-chars", type=int, default=_DEFAULT.max_prompt_chars,
                   help="longest prompt in characters, checked before tokenizing "
                        "(default: 16 per token of --max-model-len)")
    p.add_argument("--api-key", default=os.environ.get("PDSERVE_API_KEY") or _DEFAULT.api_key,
                   help="require 'Authorization: Bearer KEY' (default: $PDSERVE_API_KEY)")
    p.add_argument("--health-interval", type=float, default=_DEFAULT.health_interval_s,
                   help="seconds between decode worker health probes")
    p.add_argument("--drain-grace", type=float, default=_DEFAULT.drain_grace_s,
                   help="seconds in-flight requests get to finish on SIGTERM")
    p.add_argument("--request-timeout-s", type=float, default=_DEFAULT.request_timeout_s,
                   help="deadline of a request that brings none, and the longest one allowed")
    p.add_argument("--no-migration", dest="migration", action="store_false",
                   default=_DEFAULT.migration,
                   help="fail a request whose decode worker dies instead of moving it")
    p.add_argument("--migration-limit", type=int, default=_DEFAULT.migration_limit,
                   help="the most times one request moves to another decode worker")
    p.add_argument("--members-stdin", action="store_true",
                   help="read membership updates (JSON lines) from stdin, see router/membership.py")
    _tls_args(p)
    a = p.parse_args(argv)
    try:
        return RouterConfig(
            host=a.host, port=a.port, http_port=a.http_port, model=a.model,
            served_model_name=a.served_model_name, decode=tuple(a.decode),
            prefill=tuple(a.prefill), members_stdin=a.members_stdin, policy=a.policy,
            local_prefill_below=a.local_prefill_below,
            local_prefill_stall_s=a.local_prefill_stall_s, state_interval_s=a.state_interval,
            kv_encodings=tuple(e for e in a.kv_encodings.split(",") if e),
            max_model_len=a.max_model_len,
            max_prompt_chars=a.max_prompt_chars, api_key=a.api_key, health_interval_s=a.health_interval,
            drain_grace_s=a.drain_grace, request_timeout_s=a.request_timeout_s,
            migration=a.migration, migration_limit=a.migration_limit,
            health_port=a.health_port,
            tls=tls_from_args(a.tls_ca, a.tls_cert, a.tls_key, a.tls_require_client_cert))
    except ValueError as e:
        p.error(str(e))


def _tls_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tls-ca", default=None,
                   help="CA (PEM) decode workers' certificates are checked against, and "
                        "client certificates on the public API when presented")
    p.add_argument("--tls-cert", default=None,
                   help="the router's certificate (PEM): served on the public API (gRPC and "
                        "HTTPS) and presented to decode workers (mTLS)")
    p.add_argument("--tls-key", default=None, help="the router's private key (PEM)")
    p.add_argument("--tls-require-client-cert", action="store_true",
                   help="refuse public API clients without a certificate signed by --tls-ca")
    p.add_argument("--health-port", type=int, default=_DEFAULT.health_port,
                   help="plaintext port serving only grpc.health.v1, for kubelet probes")


@dataclass
class Router:
    grpc: Server
    http: OpenAIServer | None
    generator: Generator
    health: DecodeHealth
    prefill_health: DecodeHealth
    loads: WorkerLoads

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
        await self.prefill_health.stop()
        await self.loads.stop()
        if self.http is not None:
            await self.http.stop()
        await self.grpc.stop(grace=0.5)
        await self.generator.decode.close()


async def start_router(config: RouterConfig) -> Router:
    model_dir = resolve_model(config.model, convert=False)
    model_config = json.loads((model_dir / "config.json").read_text())
    max_len = config.max_model_len or int(model_config.get("max_position_embeddings", 2048))
    model_id = config.served_model_name or model_dir.name
    logs.set_model(model_id)
    key = ApiKey(config.api_key) if config.api_key else None
    server = Server(config.host, config.port, ["pdserve.v1.Generation"],
                    [ApiKeyInterceptor(key)] if key else [], tls=config.tls,
                    health_port=config.health_port)
    metrics = RouterMetrics(model_id)
    decode = DecodeClients(config.tls)

    async def on_change(usable: bool) -> None:
        if not generator.draining:
            await server.set_serving(usable)

    async def prefill_changed(usable: bool) -> None:
        pass  # without a prefill worker up, plans are LOCAL: the router still serves

    health = DecodeHealth(config.decode, decode, on_change, config.health_interval_s)
    prefill_health = DecodeHealth(config.prefill, decode, prefill_changed,
                                  config.health_interval_s, role="prefill")
    loads = WorkerLoads(decode, config.decode, config.prefill, config.state_interval_s)
    inputs = PolicyInputs(loads.get)
    generator = Generator(model_id, RouterTokenizer(model_dir), make_policy(config, inputs),
                          max_len,
                          decode, metrics, health, prefill_health=prefill_health,
                          request_timeout_s=config.request_timeout_s,
                          migration_limit=config.migration_limit if config.migration else 0,
                          max_prompt_chars=config.max_prompt_chars)
    api_pb2_grpc.add_GenerationServicer_to_server(RouterServicer(generator), server.server)
    await server.start()
    await server.set_serving(False)
    router = Router(server, None, generator, health, prefill_health, loads)
    if config.http_port:
        router.http = OpenAIServer(generator, metrics.registry, key, lambda: router.serving)
        await router.http.start(config.host, config.http_port, config.drain_grace_s,
                                ssl_context=server_ssl_context(config.tls) if config.tls else None)
    await asyncio.gather(health.probe_all(), prefill_health.probe_all(), loads.poll_all())
    health.start()
    prefill_health.start()
    loads.start()
    return router


async def serve(config: RouterConfig) -> None:
    router = await start_router(config)
    follower = None
    if config.members_stdin:
        follower = asyncio.create_task(follow(router.generator.policy, sys.stdin.readline,
                                              _both(router.health.set_addresses,
                                                    router.loads.set_decode),
                                              _both(router.prefill_health.set_addresses,
                                                    router.loads.set_prefill)))
    scheme = "https" if config.tls else "http"
    http = f", HTTP on {scheme}://{config.host}:{router.http.port}" if router.http else ""
    grpc_kind = "TLS gRPC" if config.tls else "gRPC"
    print(f"router serving {grpc_kind} on {config.host}:{router.grpc.port}{http}", flush=True)
    await until_stop_signal()
    if follower is not None:
        follower.cancel()
    await router.drain(config.drain_grace_s)


def _both(a: Callable[[list[str]], Awaitable[None]],
          b: Callable[[list[str]], Awaitable[None]]) -> Callable[[list[str]], Awaitable[None]]:
    async def both(addresses: list[str]) -> None:
        await a(addresses)
        await b(addresses)
    return both


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
