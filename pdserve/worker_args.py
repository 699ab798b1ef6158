"""A worker's command line, both ways: ``parse_args`` (argv → WorkerConfig) and its
inverse ``worker_argv`` (WorkerConfig → argv), so a launcher builds the config and
hands the worker exactly that config, nothing parsed twice by hand.

Torch-free on purpose: launchers (the process launcher, Ray's) import it.
Every default lives in ``worker_config``'s signature, taken from pdserve/config.py.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from typing import Any

from pdserve.config import (
    KERNEL_CHOICES,
    KV_CACHE_DTYPES,
    PREFILL_FALLBACKS,
    ROLE_DEFAULTS,
    EngineConfig,
    SpeculativeConfig,
    WorkerConfig,
    tls_from_args,
)
from pdserve.logs import LOG_FORMATS
from pdserve.placement import PIN_MODES, PlacementRequest


def worker_config(role: str, *, host: str = WorkerConfig.host, port: int | None = None,
                  metrics_port: int = WorkerConfig.metrics_port, model: str | None = None,
                  dtype: str = EngineConfig.dtype, threads: int | None = None,
                  cpus: tuple[int, ...] | None = None, pin: str = PlacementRequest.mode,
                  slot: int = PlacementRequest.slot, slots: int = PlacementRequest.slots,
                  gpu_workers: int = PlacementRequest.gpu_workers,
                  device: str = EngineConfig.device, kv_cache_gb: float = EngineConfig.kv_cache_gb,
                  max_num_batched_tokens: int | None = None,
                  decode_step_budget_s: float | None = None,
                  kv_encoding: str = WorkerConfig.kv_encoding,
                  prefill_fallback: str = WorkerConfig.prefill_fallback,
                  kv_idle_timeout_s: float = WorkerConfig.kv_idle_timeout_s,
                  quantization: str | None = EngineConfig.quantization,
                  kv_cache_dtype: str = EngineConfig.kv_cache_dtype,
                  kernels: str = EngineConfig.kernels,
                  enable_prefix_caching: bool = EngineConfig.enable_prefix_caching,
                  speculative_config: SpeculativeConfig | None = None,
                  tls_ca: str | None = None, tls_cert: str | None = None,
                  tls_key: str | None = None,
                  prefill_allowlist: tuple[str, ...] = WorkerConfig.prefill_allowlist,
                  health_port: int = WorkerConfig.health_port) -> WorkerConfig:
    """The config of a worker with these options (the ones its command line has);
    ``port`` and ``max_num_batched_tokens`` default per role (ROLE_DEFAULTS)."""
    if role not in ROLE_DEFAULTS:
        raise ValueError(f"role must be one of {sorted(ROLE_DEFAULTS)}, got {role!r}")
    defaults = ROLE_DEFAULTS[role]
    batched = (defaults.max_num_batched_tokens if max_num_batched_tokens is None
               else max_num_batched_tokens)
    step_budget = (defaults.decode_step_budget_s if decode_step_budget_s is None
                   else decode_step_budget_s)
    engine = EngineConfig(model=model, dtype=dtype, device=device, num_threads=threads,
                          kv_cache_gb=kv_cache_gb, quantization=quantization,
                          kv_cache_dtype=kv_cache_dtype, kernels=kernels,
                          enable_prefix_caching=enable_prefix_caching,
                          speculative_config=speculative_config,
                          max_num_batched_tokens=batched,
                          decode_step_budget_s=step_budget)
    placement = PlacementRequest(role=role, mode=pin, cpus=cpus, slot=slot, slots=slots,
                                 threads=threads, gpu=device != "cpu",
                                 gpu_workers=gpu_workers)
    return WorkerConfig(role=role, engine=engine, host=host,
                        port=defaults.port if port is None else port, metrics_port=metrics_port,
                        placement=placement, kv_encoding=kv_encoding,
                        prefill_fallback=prefill_fallback,
                        kv_idle_timeout_s=kv_idle_timeout_s,
                        tls=tls_from_args(tls_ca, tls_cert, tls_key),
                        prefill_allowlist=prefill_allowlist, health_port=health_port)


def _cpu_list(text: str) -> tuple[int, ...]:
    return tuple(int(c) for c in text.split(","))


def speculative_config_arg(text: str) -> SpeculativeConfig | None:
    """``--speculative-config JSON`` (workers, ``pdserve up``): a bad one is a usage error."""
    try:
        return SpeculativeConfig.parse(json.loads(text))
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not JSON: {e}") from None
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _address_list(text: str) -> tuple[str, ...]:
    return tuple(a.strip() for a in text.split(",") if a.strip())


def parser(role: str) -> argparse.ArgumentParser:
    # SUPPRESS: an option not given stays out of the namespace, so worker_config's
    # default applies (written there once).
    p = argparse.ArgumentParser(prog=f"python -m {role}_worker",
                                argument_default=argparse.SUPPRESS)
    p.add_argument("--host")
    p.add_argument("--port", type=int, help=f"gRPC port (default {ROLE_DEFAULTS[role].port})")
    p.add_argument("--metrics-port", type=int, help="Prometheus port (default 0 = none)")
    p.add_argument("--model", help="HF directory or .gguf (default: SmolLM2)")
    p.add_argument("--dtype")
    p.add_argument("--quantization", help="weight quantization: int8 (default: none)")
    p.add_argument("--kv-cache-dtype", choices=KV_CACHE_DTYPES,
                   help="the KV pool's dtype: auto (the weights', default), bfloat16, float32")
    p.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction,
                   help="reuse cached KV of shared prompt prefixes (default: on)")
    p.add_argument("--speculative-config", type=speculative_config_arg,
                   help='speculative decoding as JSON (vLLM\'s flag), e.g. \'{"method": "ngram", '
                        '"num_speculative_tokens": 4, "prompt_lookup_max": 4}\' (default: off)')
    p.add_argument("--threads", type=int)
    p.add_argument("--kernels", choices=KERNEL_CHOICES,
                   help="CPU kernels per op: auto (default), torch or cpu (see EngineConfig)")
    p.add_argument("--cpus", type=_cpu_list, help="comma-separated CPU ids to pin to")
    p.add_argument("--pin", choices=PIN_MODES, help="auto (see pdserve/placement.py) or off")
    p.add_argument("--slot", type=int,
                   help="this worker's index among --slots workers on this machine")
    p.add_argument("--slots", type=int)
    p.add_argument("--gpu-workers", type=int,
                   help="the first N of the --slots workers on this machine compute on its "
                        "GPU (CPU workers then keep off the GPU's NUMA node)")
    p.add_argument("--device", help="auto, cpu or cuda")
    p.add_argument("--kv-cache-gb", type=float)
    p.add_argument("--max-num-batched-tokens", type=int,
                   help=f"default {ROLE_DEFAULTS[role].max_num_batched_tokens}")
    p.add_argument("--decode-step-budget-s", type=float,
                   help="while requests decode, cut prefill chunks so a step lasts about "
                        f"this long; 0 = off (default {ROLE_DEFAULTS[role].decode_step_budget_s})")
    p.add_argument("--kv-encoding")
    p.add_argument("--prefill-fallback", choices=list(PREFILL_FALLBACKS),
                   help="decode: what to do when every prefill worker asked failed")
    p.add_argument("--kv-idle-timeout-s", type=float,
                   help=f"decode: seconds a prefill worker may send nothing before it counts "
                        f"as failed (default {WorkerConfig.kv_idle_timeout_s})")
    p.add_argument("--tls-ca", help="CA certificate (PEM): clients must present a certificate "
                   "signed by it (mTLS); a decode worker checks prefill workers against it")
    p.add_argument("--tls-cert", help="this worker's certificate chain (PEM)")
    p.add_argument("--tls-key", help="this worker's private key (PEM)")
    p.add_argument("--prefill-allowlist", type=_address_list,
                   help="decode: comma-separated prefill host:port this worker may dial "
                        "('*' = any; default: any without TLS, none with TLS)")
    p.add_argument("--health-port", type=int,
                   help="plaintext port serving only grpc.health.v1, for kubelet probes "
                        "(default 0 = none)")
    p.add_argument("--log-format", choices=LOG_FORMATS,
                   help="auto (text on a terminal, else JSON lines), json or text")
    return p


def parse_invocation(role: str, argv: list[str] | None = None) -> tuple[WorkerConfig, str | None]:
    """The worker's config and its ``--log-format`` (None: $PDSERVE_LOG_FORMAT or auto)."""
    options: dict[str, Any] = vars(parser(role).parse_args(argv))
    log_format = options.pop("log_format", None)
    return worker_config(role, **options), log_format


def parse_args(role: str, argv: list[str] | None = None) -> WorkerConfig:
    return parse_invocation(role, argv)[0]


def worker_argv(config: WorkerConfig) -> list[str]:
    """The arguments that make ``parse_args`` return ``config``; ValueError when the
    config holds something the command line cannot say (e.g. num_kv_blocks)."""
    e, p = config.engine, config.placement
    argv = ["--host", config.host, "--port", str(config.port),
            "--metrics-port", str(config.metrics_port), "--dtype", e.dtype,
            "--device", e.device, "--kv-cache-gb", repr(e.kv_cache_gb),
            "--max-num-batched-tokens", str(e.max_num_batched_tokens),
            "--decode-step-budget-s", repr(e.decode_step_budget_s),
            "--kv-encoding", config.kv_encoding, "--prefill-fallback", config.prefill_fallback,
            "--kv-idle-timeout-s", repr(config.kv_idle_timeout_s),
            "--kernels", e.kernels, "--kv-cache-dtype", e.kv_cache_dtype,
            "--pin", p.mode, "--slot", str(p.slot), "--slots", str(p.slots)]
    if e.model is not None:
        argv += ["--model", e.model]
    if e.num_threads is not None:
        argv += ["--threads", str(e.num_threads)]
    if e.quantization is not None:
        argv += ["--quantization", e.quantization]
    if not e.enable_prefix_caching:
        argv += ["--no-enable-prefix-caching"]
    if e.speculative_config is not None:
        argv += ["--speculative-config", json.dumps(dataclasses.asdict(e.speculative_config))]
    if p.cpus is not None:
        argv += ["--cpus", ",".join(map(str, p.cpus))]
    if p.gpu_workers:
        argv += ["--gpu-workers", str(p.gpu_workers)]
    argv += _tls_argv(config)
    if parse_args(config.role, argv) != config:
        raise ValueError(f"a {config.role} worker's command line cannot express {config}")
    return argv


def _tls_argv(config: WorkerConfig) -> list[str]:
    argv: list[str] = []
    if config.tls is not None:
        for flag, path in (("--tls-ca", config.tls.ca), ("--tls-cert", config.tls.cert),
                           ("--tls-key", config.tls.key)):
            argv += [flag, str(path)]
    if config.prefill_allowlist:
        argv += ["--prefill-allowlist", ",".join(config.prefill_allowlist)]
    if config.health_port:
        argv += ["--health-port", str(config.health_port)]
    return argv


def worker_command(config: WorkerConfig) -> list[str]:
    """``python -m prefill_worker`` / ``decode_worker`` with ``config``'s arguments."""
    return [sys.executable, "-m", f"{config.role}_worker", *worker_argv(config)]
