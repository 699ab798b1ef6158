"""The router process: ``python -m router --decode ADDR --prefill ADDR`` (static
membership) or ``python -m router --members-stdin`` (updates from its owner)."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys

from pdserve._proto.pdserve.v1 import api_pb2_grpc
from pdserve.engine.model_loader import resolve_model
from pdserve.grpc_server import Server, exit_with_parent, until_stop_signal
from router.membership import follow
from router.policy import LoadAwarePolicy, Member
from router.servicer import RouterServicer
from router.tokenizer import RouterTokenizer

log = logging.getLogger("pdserve.router")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m router")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=50051)
    p.add_argument("--model", default=None, help="HF directory or .gguf (default: SmolLM2)")
    p.add_argument("--decode", action="append", default=[], help="decode worker host:port")
    p.add_argument("--prefill", action="append", default=[], help="prefill worker host:port")
    p.add_argument("--local-prefill-below", type=int, default=16,
                   help="prompts shorter than this are prefilled on the decode worker")
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--members-stdin", action="store_true",
                   help="read membership updates (JSON lines) from stdin, see router/membership.py")
    a = p.parse_args(argv)
    if not a.decode and not a.members_stdin:
        p.error("--decode: at least one decode worker address is required")
    return a


async def start_router(a: argparse.Namespace) -> tuple[Server, RouterServicer]:
    model_dir = resolve_model(a.model, convert=False)
    config = json.loads((model_dir / "config.json").read_text())
    max_len = a.max_model_len or int(config.get("max_position_embeddings", 2048))
    policy = LoadAwarePolicy([Member(x) for x in a.decode], [Member(x) for x in a.prefill],
                             a.local_prefill_below)
    servicer = RouterServicer(model_dir.name, RouterTokenizer(model_dir), policy, max_len)
    server = Server(a.host, a.port, ["pdserve.v1.Generation"])
    api_pb2_grpc.add_GenerationServicer_to_server(servicer, server.server)
    await server.start()
    await server.set_serving(True)
    return server, servicer


async def serve(a: argparse.Namespace) -> None:
    server, servicer = await start_router(a)
    if a.members_stdin:
        follower = asyncio.create_task(follow(servicer.policy, sys.stdin.readline))
    print(f"router serving on {a.host}:{server.port}", flush=True)
    await until_stop_signal()
    if a.members_stdin:
        follower.cancel()
    await server.stop(grace=10.0)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s router %(levelname)s %(name)s: %(message)s")
    exit_with_parent()
    try:
        asyncio.run(serve(parse_args(argv)))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
