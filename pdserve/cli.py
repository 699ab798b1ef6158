"""``pdserve`` command line: up | generate | chat | bench | prepare-model | certs."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Iterator
from typing import Any


def main(argv: list[str] | None = None) -> int:
    from pdserve import __version__

    parser = argparse.ArgumentParser(prog="pdserve", description=__doc__)
    parser.add_argument("--version", action="version", version=f"pdserve {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prepare-model", help="convert a model (default: SmolLM2) into the cache "
                       "and build the CPU kernels")
    p.add_argument("--model", default=None)

    k = sub.add_parser("certs", help="make a development CA and per-role certificates (mTLS)")
    k.add_argument("directory")
    k.add_argument("--host", action="append", default=[],
                   help="extra SAN (DNS name or IP) in every certificate; repeatable")
    k.add_argument("--force", action="store_true", help="replace existing files")

    u = sub.add_parser("up", help="start router, prefill and decode workers (Ray actors by default)")
    _up_args(u)

    g = sub.add_parser("generate", help="stream one answer from the router")
    g.add_argument("prompt")
    g.add_argument("--address", default="127.0.0.1:50051", help="router gRPC address")
    g.add_argument("--api-key", default=None, help="router API key (default: $PDSERVE_API_KEY)")
    g.add_argument("--tls-ca", default=None, help="CA to verify the router with (TLS)")
    g.add_argument("--tls-cert", default=None, help="client certificate (mTLS)")
    g.add_argument("--tls-key", default=None, help="client private key (mTLS)")
    g.add_argument("--offline", action="store_true",
                   help="run the offline engine in this process instead of asking the router")
    _engine_args(g)
    _sampling_args(g)
    g.add_argument("--chat", action="store_true", help="apply the model's chat template")

    c = sub.add_parser("chat", help="interactive chat: with the cluster (--address) or the "
                       "offline engine")
    c.add_argument("--address", default=None,
                   help="chat with the cluster whose router serves gRPC here (HOST:PORT); "
                        "default: the offline engine in this process")
    c.add_argument("--api-key", default=None, help="router API key (default: $PDSERVE_API_KEY)")
    _engine_args(c)
    _sampling_args(c)

    b = sub.add_parser("bench", help="run the benchmark workloads (see bench/)")
    from bench.cli import add_arguments

    add_arguments(b)

    args = parser.parse_args(argv)
    try:
        return int(_dispatch(args) or 0)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _dispatch(args: argparse.Namespace) -> int | None:
    if args.command == "prepare-model":
        from pdserve.engine import cpu_kernels
        from pdserve.model_files import resolve_model

        print(resolve_model(args.model))
        cpu_kernels.load()  # built once here (a minute or two), not by the first worker
        return 0
    if args.command == "bench":
        from bench.cli import run

        return run(args)
    if args.command == "up":
        return _up(args)
    if args.command == "certs":
        from pdserve.certs import ROLES, write_certs

        files = write_certs(args.directory, args.host, force=args.force)
        print(f"CA {files.ca}; certificates for {', '.join(ROLES)} in {files.directory}")
        return 0
    if args.command == "generate":
        return _generate_offline(args) if args.offline else _generate_remote(args)
    if args.address:
        from pdserve.remote_chat import chat

        return chat(args.address, args.api_key, _sampling_kw(args))
    return _chat(args)


def _engine_args(p: argparse.ArgumentParser) -> None:
    from pdserve.config import QUANTIZATIONS

    p.add_argument("--model", default=None, help="HF directory or .gguf (default: SmolLM2)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32", "float16"])
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--quantization", default=None, choices=QUANTIZATIONS,
                   help="weight quantization (default: none)")


def _sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=-1)
    p.add_argument("--seed", type=int, default=None)


def _sampling_kw(args: argparse.Namespace) -> dict[str, Any]:
    return dict(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                top_k=args.top_k, seed=args.seed)


def _make_llm(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from pdserve import LLM

    return LLM(model=args.model, dtype=args.dtype, num_threads=args.threads,
               quantization=args.quantization)


def _params(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from pdserve import SamplingParams

    return SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature,
                          top_p=args.top_p, top_k=args.top_k, seed=args.seed)


def _stream(llm, prompt, params) -> Iterator[str]:  # type: ignore[no-untyped-def]
    """Yield text deltas; report TTFT and TPOT on stderr at the end."""
    engine = llm.engine
    rid = f"cli-{time.monotonic_ns()}"
    engine.add_request(rid, prompt, params)
    final = None
    while engine.has_unfinished_requests:
        for out in engine.step():
            if out.request_id == rid:
                yield out.new_text
                final = out
    if final is not None and final.timings is not None:
        t = final.timings
        n = len(final.token_ids)
        tpot = (t.e2e_s - t.ttft_s) / (n - 1) if n > 1 and t.e2e_s and t.ttft_s else 0.0
        print(f"\n[{n} tokens, finish={final.finish_reason}, TTFT {1e3 * (t.ttft_s or 0):.1f} ms, "
              f"TPOT {1e3 * tpot:.1f} ms]", file=sys.stderr)


def _up_args(u: argparse.ArgumentParser) -> None:
    from pdserve.config import DEVICES, KV_CACHE_DTYPES, QUANTIZATIONS, RouterConfig
    from pdserve.launchers import names
    from pdserve.logs import LOG_FORMATS
    from pdserve.placement import PIN_MODES
    from pdserve.worker_args import speculative_config_arg

    u.add_argument("--config", default=None,
                   help="cluster config YAML (see README); default: the built-in local "
                        "cluster, or with --address the launcher's packaged config "
                        "(deploy/ray/cluster.yaml)")
    u.add_argument("--model", default=None)
    u.add_argument("--dtype", default=None)
    u.add_argument("--quantization", default=None, choices=QUANTIZATIONS,
                   help="every worker's weight quantization (default: none)")
    u.add_argument("--kv-cache-dtype", default=None, choices=KV_CACHE_DTYPES,
                   help="every worker's KV pool dtype (default: auto, the weights')")
    u.add_argument("--no-enable-prefix-caching", dest="enable_prefix_caching",
                   action="store_false", default=None,
                   help="every worker recomputes shared prompt prefixes instead of reusing "
                        "their cached KV")
    u.add_argument("--speculative-config", type=speculative_config_arg, default=None,
                   help='decode workers\' speculative decoding as JSON, e.g. \'{"method": "ngram", '
                        '"num_speculative_tokens": 4}\' (default: off)')
    u.add_argument("--kv-encodings", default=None,
                   help="KV wire encodings the router may pick per request on a slow link, "
                        "comma-separated (int8: lossy; default: none)")
    u.add_argument("--http-port", type=int, default=None,
                   help=f"router's OpenAI-compatible HTTP port (default {RouterConfig.http_port}; "
                        "0 = off)")
    u.add_argument("--api-key", default=None,
                   help="require this bearer token on the public API (or $PDSERVE_API_KEY)")
    u.add_argument("--launcher", choices=names(), default=None,
                   help="ray (default): actors on a local or existing Ray cluster; "
                        "process: plain processes on this machine")
    u.add_argument("--address", default=None,
                   help="join this Ray cluster (e.g. auto or HOST:6379) instead of starting one")
    u.add_argument("--prefill", type=int, default=None, help="number of prefill workers")
    u.add_argument("--prefill-device", choices=DEVICES, default=None,
                   help="prefill workers' device (default auto: CUDA when present)")
    u.add_argument("--decode-device", choices=DEVICES, default=None,
                   help="decode workers' device (default auto); --prefill-device cuda "
                        "--decode-device cpu: GPU prefill, CPU decode on one machine")
    u.add_argument("--decode", type=int, default=None, help="number of decode workers")
    u.add_argument("--pin", choices=PIN_MODES, default=None,
                   help="CPU pinning of the workers (default auto)")
    u.add_argument("--certs", default=None,
                   help="mTLS on every hop with the certificates of `pdserve certs DIR`")
    u.add_argument("--no-migration", dest="migration", action="store_false", default=None,
                   help="a decode worker dying mid-stream fails its requests instead of "
                        "moving them to another decode worker")
    u.add_argument("--log-format", choices=LOG_FORMATS, default=None,
                   help="every role's log lines: auto (text on a terminal, else JSON), json "
                        "or text (default: $PDSERVE_LOG_FORMAT or auto)")


def _up(args: argparse.Namespace) -> int:
    import dataclasses
    import os

    from pdserve import launchers, logs
    from pdserve.cluster_config import ClusterConfig, default_member, scaled

    if args.log_format:  # the roles read it from their environment
        os.environ[logs.FORMAT_ENV] = args.log_format
    logs.configure("launcher")
    path = args.config or (launchers.packaged_config(args.launcher or "ray")
                           if args.address else None)
    if path and not args.config:
        print(f"pdserve up: no --config, using the packaged {path}", file=sys.stderr)
    config = ClusterConfig.from_yaml(path) if path else ClusterConfig()
    overrides: dict[str, Any] = {k: v for k, v in (
        ("model", args.model), ("dtype", args.dtype), ("quantization", args.quantization),
        ("kv_cache_dtype", args.kv_cache_dtype),
        ("launcher", args.launcher), ("prefill_device", args.prefill_device),
        ("decode_device", args.decode_device),
        ("pin", args.pin), ("api_key", args.api_key), ("certs", args.certs)) if v}
    if args.http_port is not None:
        overrides["http_port"] = args.http_port
    if args.migration is not None:
        overrides["migration"] = args.migration
    if args.enable_prefix_caching is not None:
        overrides["enable_prefix_caching"] = args.enable_prefix_caching
    if args.speculative_config is not None:
        overrides["speculative_config"] = args.speculative_config
    if args.kv_encodings is not None:
        overrides["kv_encodings"] = tuple(e for e in args.kv_encodings.split(",") if e)
    if args.address:
        overrides["ray"] = dataclasses.replace(config.ray, address=args.address)
        overrides.setdefault("launcher", "ray")
    for role, n in (("prefill", args.prefill), ("decode", args.decode)):
        if n is not None:
            overrides[role] = scaled(getattr(config, role), n, default_member(role))
    config = dataclasses.replace(config, **overrides)
    return launchers.find(config.launcher)(config)


def _generate_remote(args: argparse.Namespace) -> int:
    import grpc

    from pdserve.client import Client
    from pdserve.config import tls_from_args

    tls = tls_from_args(args.tls_ca, args.tls_cert, args.tls_key, require_client_cert=False)
    client = Client(args.address, api_key=args.api_key, tls=tls)
    kw = _sampling_kw(args)
    prompt_kw = ({"messages": [{"role": "user", "content": args.prompt}]} if args.chat
                 else {"prompt": args.prompt})
    last = None
    try:
        for d in client.generate(**prompt_kw, **kw):  # type: ignore[arg-type]
            sys.stdout.write(d.text)
            sys.stdout.flush()
            last = d
    except grpc.RpcError as e:
        print(f"\nerror: {e.code().name}: {e.details()}", file=sys.stderr)  # type: ignore[attr-defined]
        return 1
    sys.stdout.write("\n")
    sys.stdout.flush()
    if last is not None and last.timings:
        t, n = last.timings, last.completion_tokens
        tpot = (t["e2e_s"] - t["ttft_s"]) / (n - 1) if n > 1 else 0.0
        print(f"[{n} tokens, finish={last.finish_reason}, plan={t['plan']}, "
              f"TTFT {1e3 * t['ttft_s']:.1f} ms, TPOT {1e3 * tpot:.1f} ms]", file=sys.stderr)
    return 0


def _generate_offline(args: argparse.Namespace) -> int:
    llm = _make_llm(args)
    params = _params(args)
    prompt = (llm.apply_chat_template([{"role": "user", "content": args.prompt}])
              if args.chat else args.prompt)
    for delta in _stream(llm, prompt, params):
        sys.stdout.write(delta)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


def _chat(args: argparse.Namespace) -> int:
    llm = _make_llm(args)
    params = _params(args)
    history: list[dict[str, str]] = []
    print("pdserve chat on the offline engine. /exit, an empty line or Ctrl-D quits.",
          file=sys.stderr)
    while True:
        try:
            line = input("you> ").strip()
        except (EOFError, KeyboardInterrupt):
            break
        if not line or line == "/exit":
            break
        history.append({"role": "user", "content": line})
        answer = ""
        sys.stdout.write("assistant> ")
        for delta in _stream(llm, llm.apply_chat_template(history), params):
            answer += delta
            sys.stdout.write(delta)
            sys.stdout.flush()
        history.append({"role": "assistant", "content": answer})
    return 0


if __name__ == "__main__":
    sys.exit(main())
