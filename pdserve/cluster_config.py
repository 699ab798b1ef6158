"""The cluster config of ``pdserve up``: which roles, where, with what (YAML or code).

A cluster config (YAML) names the model, dtype, quantization, KV encoding, the launcher, the
router's ports and API key, and each member's ports (and optionally CPUs). Every
default comes from the role configs of pdserve/config.py (RouterConfig,
WorkerConfig, ROLE_DEFAULTS): router gRPC :50051 and OpenAI HTTP :8000, prefill
:50061 (metrics :9061), decode :50071 (metrics :9071). Workers pin themselves
(pdserve/placement.py): without explicit ``cpus`` worker i of n on a machine gets
its share of the NUMA nodes and CPUs, so on a 2-CPU box prefill runs on CPU 0 and
decode on CPU 1, one torch thread each.

``certs: DIR`` (or ``pdserve up --certs DIR``; DIR made by ``pdserve certs DIR``,
see pdserve/certs.py) turns on mTLS on every hop: each role serves with its own
certificate from DIR and requires client certificates signed by DIR's CA (the
router's public API only with ``tls_require_client_cert``); the launcher's health
probes use ``client.pem``. Every decode worker gets the prefill pool's addresses as
its ``prefill_allowlist`` (with or without certs), so it dials no other address.

The config validates by building the role configs it implies (``worker``,
``router``): one set of rules, the roles' own. Launchers hand those configs on.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pdserve import launchers
from pdserve.certs import CertFiles
from pdserve.config import (
    ROLE_DEFAULTS,
    EngineConfig,
    RouterConfig,
    SpeculativeConfig,
    TLSConfig,
    WorkerConfig,
)
from pdserve.placement import PlacementRequest
from pdserve.worker_args import worker_config


@dataclass(frozen=True)
class Member:
    port: int
    metrics_port: int = 0
    cpus: tuple[int, ...] | None = None
    threads: int | None = None


def default_member(role: str) -> Member:
    d = ROLE_DEFAULTS[role]
    return Member(d.port, d.metrics_port)


def scaled(members: list[Member], n: int, default: Member) -> list[Member]:
    """``--prefill N``: N members, ports counting up from the first configured one."""
    base = members[0] if members else default
    return [Member(base.port + i if base.port else 0,
                   base.metrics_port + i if base.metrics_port else 0,
                   None, base.threads) for i in range(n)]


@dataclass(frozen=True)
class RaySettings:
    """How the Ray launcher finds nodes and places roles (see deploy/ray/launcher.py)."""

    address: str | None = None
    """None: start a local Ray instance; else join it ("auto", "ray://…", "host:port")."""
    namespace: str = "pdserve"
    prefill_resource: str = "pdserve_prefill"
    """Custom node resource a prefill worker needs one unit of (e.g. cloud GPU nodes)."""
    decode_resource: str = "pdserve_decode"
    router_resource: str | None = None
    """None: the router runs next to the launcher (soft); else on a node with it."""
    prefill_gpus: float = 0.0
    """GPUs each prefill worker needs (0 = none)."""
    decode_gpus: float = 0.0
    max_restarts: int = 3
    """How often Ray restarts a worker whose process died."""

    def __post_init__(self) -> None:
        if self.max_restarts < -1:
            raise ValueError(f"ray.max_restarts must be >= -1, got {self.max_restarts}")
        if self.prefill_gpus < 0 or self.decode_gpus < 0:
            raise ValueError("ray.prefill_gpus and ray.decode_gpus must be >= 0")


@dataclass(frozen=True)
class ClusterConfig:
    model: str | None = None
    dtype: str = EngineConfig.dtype
    quantization: str | None = EngineConfig.quantization
    """Every worker's weight quantization: None or int8 (see EngineConfig)."""
    kv_cache_dtype: str = EngineConfig.kv_cache_dtype
    """Every worker's KV pool dtype: auto, bfloat16 or float32 (see EngineConfig)."""
    enable_prefix_caching: bool = EngineConfig.enable_prefix_caching
    """Every worker keeps and reuses the KV of prompt prefixes (see EngineConfig)."""
    speculative_config: SpeculativeConfig | None = EngineConfig.speculative_config
    """Decode workers' speculative decoding, e.g. {method: ngram, num_speculative_tokens:
    4} (see SpeculativeConfig); prefill workers sample one token and never speculate."""
    kv_encoding: str = WorkerConfig.kv_encoding
    prefill_device: str = EngineConfig.device
    """Prefill workers' device: auto (CUDA when present), cpu or cuda."""
    decode_device: str = EngineConfig.device
    """Decode workers' device. ``prefill_device: cuda`` with ``decode_device: cpu`` is
    the cloud-prefill / local-decode split on one machine: prefill pins next to the
    GPU, decode to the CPUs outside the GPU's NUMA node (pdserve/placement.py)."""
    host: str = RouterConfig.host
    router_port: int = RouterConfig.port
    http_port: int = RouterConfig.http_port
    """The router's OpenAI-compatible HTTP port (0 = off)."""
    api_key: str | None = None
    """Bearer token the router requires (also $PDSERVE_API_KEY); None = open."""
    policy: str = RouterConfig.policy
    """The router's routing policy: cost_model or load_aware (see RouterConfig)."""
    local_prefill_below: int = RouterConfig.local_prefill_below
    kv_encodings: tuple[str, ...] = RouterConfig.kv_encodings
    """Wire encodings the cost model may pick per request on a slow link, e.g. [int8]."""
    prefill_fallback: str = WorkerConfig.prefill_fallback
    """Decode workers, when every prefill worker asked failed (unreachable, died,
    silent, full): local (prefill the prompt themselves) or fail (UNAVAILABLE)."""
    kv_idle_timeout_s: float = WorkerConfig.kv_idle_timeout_s
    """Decode workers: seconds a prefill worker may send nothing before it counts as failed."""
    migration: bool = RouterConfig.migration
    """The router moves a request whose decode worker dies mid-stream to another one."""
    launcher: str = "ray"
    """A name in the ``pdserve.launchers`` registry (pdserve/launchers.py)."""
    pin: str = PlacementRequest.mode
    """auto: workers pin themselves (pdserve/placement.py); off: no pinning."""
    certs: str | None = None
    """Directory of ``pdserve certs DIR``: mTLS on every hop; None = plaintext."""
    tls_require_client_cert: bool = False
    """With ``certs``: the router's public API also requires a client certificate."""
    ray: RaySettings = RaySettings()
    prefill: list[Member] = field(default_factory=lambda: [default_member("prefill")])
    decode: list[Member] = field(default_factory=lambda: [default_member("decode")])

    def __post_init__(self) -> None:
        object.__setattr__(self, "speculative_config",  # a YAML mapping
                           SpeculativeConfig.parse(self.speculative_config))
        names = launchers.names()
        if self.launcher not in names:
            raise ValueError(f"launcher must be one of {names}, got {self.launcher!r}")
        if not self.decode:
            raise ValueError("decode: at least one decode worker is required")
        if self.certs is not None:
            for path in CertFiles(Path(self.certs)).all_paths():
                if path.name != "ca-key.pem" and not path.is_file():
                    raise ValueError(f"certs: {path} is missing; make the directory with "
                                     f"`pdserve certs {self.certs}`")
        self.router([], [], members_stdin=True)  # the roles' own validation, now
        for role, m in self.members():
            self.worker(role, m, 0, 1)

    def members(self) -> list[tuple[str, Member]]:
        """Every worker, prefill first (slot 0 is CPU 0 on a 2-CPU box)."""
        return [("prefill", m) for m in self.prefill] + [("decode", m) for m in self.decode]

    def worker(self, role: str, m: Member, slot: int, slots: int,
               prefill_pool: list[str] | None = None) -> WorkerConfig:
        """Member ``m``'s config; it is worker ``slot`` of ``slots`` on its machine. A
        decode worker may dial ``prefill_pool`` only (default: ``prefill_addresses()``)."""
        tls = self.tls(role)
        pool = self.prefill_addresses() if prefill_pool is None else prefill_pool
        # Every worker on this machine (prefill first): the prefill slots hold the GPU.
        split = self.prefill_device != "cpu" and self.decode_device == "cpu"
        gpu_workers = len(self.prefill) if split and slots == len(self.members()) else 0
        return worker_config(role, host=self.host, port=m.port, metrics_port=m.metrics_port,
                             model=self.model, dtype=self.dtype, quantization=self.quantization,
                             kv_cache_dtype=self.kv_cache_dtype,
                             enable_prefix_caching=self.enable_prefix_caching,
                             speculative_config=self.speculative_config
                             if role == "decode" else None,
                             threads=m.threads, cpus=m.cpus,
                             device=self.prefill_device if role == "prefill" else self.decode_device,
                             pin=self.pin, slot=slot, slots=slots, gpu_workers=gpu_workers,
                             kv_encoding=self.kv_encoding,
                             prefill_fallback=self.prefill_fallback,
                             kv_idle_timeout_s=self.kv_idle_timeout_s,
                             tls_ca=tls.ca if tls else None, tls_cert=tls.cert if tls else None,
                             tls_key=tls.key if tls else None,
                             prefill_allowlist=tuple(pool) if role == "decode" else ())

    def prefill_addresses(self) -> list[str]:
        """The prefill pool as the router and the decode workers name it (members on a
        free port, 0, cannot be named in advance and are left out)."""
        return [f"{self.host}:{m.port}" for m in self.prefill if m.port]

    def tls(self, role: str) -> TLSConfig | None:
        """``role``'s TLS from ``certs`` (router, prefill, decode; client: the launcher's
        probes and ``pdserve generate``); None without certs."""
        if self.certs is None:
            return None
        require = role != "router" or self.tls_require_client_cert
        # Absolute: Ray actors (and the processes they start) run in another directory.
        return CertFiles(Path(self.certs).resolve()).tls(role, require_client_cert=require)

    def router(self, decode: list[str], prefill: list[str],
               members_stdin: bool = False) -> RouterConfig:
        """The router's config, routing to these addresses (or to what stdin says)."""
        return RouterConfig(host=self.host, port=self.router_port, http_port=self.http_port,
                            model=self.model, decode=tuple(decode), prefill=tuple(prefill),
                            members_stdin=members_stdin, policy=self.policy,
                            local_prefill_below=self.local_prefill_below, api_key=self.api_key,
                            migration=self.migration, kv_encodings=self.kv_encodings,
                            tls=self.tls("router"))

    @classmethod
    def from_yaml(cls, path: str | Path) -> ClusterConfig:
        data: dict[str, Any] = yaml.safe_load(Path(path).read_text()) or {}
        known = set(cls.__dataclass_fields__)
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"cluster config: unknown keys {sorted(unknown)}; "
                             f"allowed: {sorted(known)}")
        for role in ("prefill", "decode"):
            if role in data:
                data[role] = [_member(role, i, m) for i, m in enumerate(data[role] or [])]
        if "ray" in data:
            ray = data["ray"] or {}
            allowed = set(RaySettings.__dataclass_fields__)
            if not isinstance(ray, dict) or set(ray) - allowed:
                raise ValueError(f"ray must be a mapping with keys among {sorted(allowed)}, "
                                 f"got {ray!r}")
            data["ray"] = RaySettings(**ray)
        if "kv_encodings" in data:
            data["kv_encodings"] = tuple(data["kv_encodings"] or ())
        return cls(**data)


def _member(role: str, i: int, m: dict[str, Any]) -> Member:
    allowed = {"port", "metrics_port", "cpus", "threads"}
    if not isinstance(m, dict) or "port" not in m or set(m) - allowed:
        raise ValueError(f"{role}[{i}] must be a mapping with port and optionally "
                         f"metrics_port, cpus, threads; got {m!r}")
    cpus = m.get("cpus")
    return Member(int(m["port"]), int(m.get("metrics_port", 0)),
                  tuple(cpus) if cpus is not None else None, m.get("threads"))
