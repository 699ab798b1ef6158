"""Frozen, validated configuration for each pdserve role.

Validation happens here, at the boundary: a bad value raises ``ValueError``
naming the field and what is allowed, before any model is loaded.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pdserve.placement import PlacementRequest

DType = Literal["bfloat16", "float32", "float16"]
DTYPES: tuple[str, ...] = ("bfloat16", "float32", "float16")
DEVICES: tuple[str, ...] = ("auto", "cpu", "cuda")
KERNEL_CHOICES: tuple[str, ...] = ("auto", "torch", "cpu")
QUANTIZATIONS: tuple[str, ...] = ("int8",)  # vLLM's names
QUANTIZABLE_DTYPES: tuple[str, ...] = ("bfloat16", "float32")


def _require(ok: bool, field: str, allowed: str, value: object) -> None:
    if not ok:
        raise ValueError(f"{field} must be {allowed}, got {value!r}")


@dataclass(frozen=True)
class EngineConfig:
    """Everything the engine needs to build its model, KV pool and scheduler."""

    model: str | None = None
    """Local HF directory or .gguf file; None = the default model (SmolLM2-135M-Instruct)."""
    dtype: str = "bfloat16"
    """Weight dtype: bfloat16, float32 or float16. Activations and the KV cache use
    it too where the hardware computes it natively (CUDA, AVX512-BF16/AMX CPUs);
    elsewhere they are float32 (see pdserve/engine/linear.py)."""
    device: str = "auto"
    """auto (CUDA when present, else CPU), cpu or cuda."""
    block_size: int = 16
    """Tokens per KV block."""
    kv_cache_gb: float = 1.0
    """Memory for the KV pool; ignored when num_kv_blocks is set."""
    num_kv_blocks: int | None = None
    """Exact number of KV blocks in the pool (overrides kv_cache_gb)."""
    max_model_len: int | None = None
    """Longest prompt + output; None = the model's max_position_embeddings."""
    max_num_batched_tokens: int = 2048
    """Token budget of one engine step: decode tokens plus prefill chunks."""
    max_num_seqs: int = 128
    """Most requests running at once."""
    num_threads: int | None = None
    """torch intra-op threads; None = leave torch's default."""
    seed: int = 0
    """Seed for requests that give none (sampling stays random across requests)."""
    kernels: str = "auto"
    """CPU kernels per op: auto (per op, the faster of pdserve's kernels and torch's on
    this machine, timed once and cached; kernels apply on CPU with float32 compute),
    torch (plain torch ops everywhere) or cpu (every self-checked kernel, required)."""
    quantization: str | None = None
    """Weight quantization (vLLM's name): None (weights in ``dtype``) or int8 (int8 with
    an fp16 scale and zero per group of 32 inputs; activations stay in the compute
    dtype; see pdserve/engine/int8_linear.py). Needs dtype bfloat16 or float32."""

    def __post_init__(self) -> None:
        _require(self.dtype in DTYPES, "dtype", f"one of {DTYPES}", self.dtype)
        _require(self.device in DEVICES, "device", f"one of {DEVICES}", self.device)
        _require(self.block_size in (8, 16, 32), "block_size", "8, 16 or 32", self.block_size)
        _require(self.kv_cache_gb > 0, "kv_cache_gb", "> 0", self.kv_cache_gb)
        if self.num_kv_blocks is not None:
            _require(self.num_kv_blocks >= 1, "num_kv_blocks", ">= 1", self.num_kv_blocks)
        if self.max_model_len is not None:
            _require(self.max_model_len >= 2, "max_model_len", ">= 2", self.max_model_len)
        _require(
            self.max_num_batched_tokens >= 16,
            "max_num_batched_tokens",
            ">= 16",
            self.max_num_batched_tokens,
        )
        _require(self.max_num_seqs >= 1, "max_num_seqs", ">= 1", self.max_num_seqs)
        if self.num_threads is not None:
            _require(self.num_threads >= 1, "num_threads", ">= 1", self.num_threads)
        _require(self.kernels in KERNEL_CHOICES, "kernels", f"one of {KERNEL_CHOICES}",
                 self.kernels)
        _require(self.quantization is None or self.quantization in QUANTIZATIONS,
                 "quantization", f"None or one of {QUANTIZATIONS}", self.quantization)
        if self.quantization is not None:
            _require(self.dtype in QUANTIZABLE_DTYPES, "quantization",
                     f"used with dtype in {QUANTIZABLE_DTYPES} (dtype={self.dtype!r})",
                     self.quantization)


PREFILL_FALLBACKS = ("local", "fail")
KV_SOURCES: tuple[str, ...] = ("grpc", "loopback")
KV_ENCODINGS: tuple[str, ...] = ("model", "fp32", "bf16", "fp16", "int8")


@dataclass(frozen=True)
class WorkerConfig:
    """A prefill or decode worker process."""

    role: str
    """prefill or decode."""
    engine: EngineConfig = EngineConfig()
    host: str = "127.0.0.1"
    port: int = 0
    """gRPC port; 0 picks a free one."""
    metrics_port: int = 0
    """Prometheus port; 0 = no metrics endpoint."""
    placement: PlacementRequest = PlacementRequest()
    """Which CPUs the process pins itself to (see pdserve/placement.py)."""
    kv_encoding: str = "model"
    """Decode: encoding asked of prefill workers unless the request names one."""
    prefill_timeout_s: float = 120.0
    """Decode: longest wait for a remote prefill when the call has no deadline."""
    prefill_fallback: str = "local"  # one of PREFILL_FALLBACKS
    """Decode: when the prefill worker is unreachable or dies mid-transfer, ``local``
    prefills here instead; ``fail`` ends the request with UNAVAILABLE."""
    kv_source: str = "grpc"
    """Decode: where remote KV comes from: ``grpc`` (prefill workers) or ``loopback``
    (an in-process fake prefilling on this worker; tests)."""

    def __post_init__(self) -> None:
        _require(self.role in ("prefill", "decode"), "role", "prefill or decode", self.role)
        _require(0 <= self.port < 65536, "port", "in [0, 65535]", self.port)
        _require(0 <= self.metrics_port < 65536, "metrics_port", "in [0, 65535]",
                 self.metrics_port)
        _require(self.kv_encoding in KV_ENCODINGS, "kv_encoding", f"one of {KV_ENCODINGS}",
                 self.kv_encoding)
        _require(self.prefill_fallback in PREFILL_FALLBACKS, "prefill_fallback",
                 f"one of {PREFILL_FALLBACKS}", self.prefill_fallback)
        _require(self.kv_source in KV_SOURCES, "kv_source", f"one of {KV_SOURCES}",
                 self.kv_source)


@dataclass(frozen=True)
class RoleDefaults:
    """What a worker of one role gets unless told otherwise (CLI, cluster YAML, code)."""

    port: int
    metrics_port: int
    """The cluster's default; a worker started by hand serves no metrics unless asked."""
    max_num_batched_tokens: int


ROLE_DEFAULTS: dict[str, RoleDefaults] = {
    # A prefill worker has no decode batch to keep responsive: whole 2,048-token
    # chunks (bigger GEMMs, and 1.5 MB KV messages instead of 0.4 MB ones).
    "prefill": RoleDefaults(port=50061, metrics_port=9061, max_num_batched_tokens=2048),
    "decode": RoleDefaults(port=50071, metrics_port=9071, max_num_batched_tokens=512),
}


ROUTING_POLICIES: tuple[str, ...] = ("load_aware",)


@dataclass(frozen=True)
class RouterConfig:
    """The router process: public gRPC + OpenAI HTTP, and whom it routes to."""

    host: str = "127.0.0.1"
    port: int = 50051
    """Public gRPC port (0 picks a free one)."""
    http_port: int = 8000
    """OpenAI-compatible HTTP port, also /health and /metrics (0 = off)."""
    model: str | None = None
    """HF directory or .gguf; None = the default model."""
    served_model_name: str | None = None
    """The model's name in the API; None = its directory's name."""
    decode: tuple[str, ...] = ()
    """Decode worker addresses (host:port)."""
    prefill: tuple[str, ...] = ()
    """Prefill worker addresses (host:port)."""
    members_stdin: bool = False
    """Read membership updates (JSON lines) from stdin instead of a static list."""
    policy: str = "load_aware"
    """Routing policy, one of ROUTING_POLICIES."""
    local_prefill_below: int = 16
    """Prompts shorter than this are prefilled on the decode worker (plan LOCAL)."""
    max_model_len: int | None = None
    """None = the model's max_position_embeddings."""
    api_key: str | None = None
    """Bearer token required on the public API; None = open."""
    health_interval_s: float = 1.0
    """Seconds between decode worker health probes."""
    drain_grace_s: float = 10.0
    """Seconds in-flight requests get to finish on SIGTERM."""

    def __post_init__(self) -> None:
        _require(0 <= self.port < 65536, "port", "in [0, 65535]", self.port)
        _require(0 <= self.http_port < 65536, "http_port", "in [0, 65535]", self.http_port)
        _require(bool(self.decode) or self.members_stdin, "decode",
                 "at least one decode worker address (or members_stdin)", self.decode)
        for field_name in ("decode", "prefill"):
            for a in getattr(self, field_name):
                _require(isinstance(a, str) and ":" in a, field_name, "a list of host:port", a)
        _require(self.policy in ROUTING_POLICIES, "policy", f"one of {ROUTING_POLICIES}",
                 self.policy)
        _require(self.local_prefill_below >= 0, "local_prefill_below", ">= 0",
                 self.local_prefill_below)
        if self.max_model_len is not None:
            _require(self.max_model_len >= 2, "max_model_len", ">= 2", self.max_model_len)
        if self.api_key is not None:
            _require(isinstance(self.api_key, str) and bool(self.api_key), "api_key",
                     "a non-empty string or None", self.api_key)
        _require(self.health_interval_s > 0, "health_interval_s", "> 0", self.health_interval_s)
        _require(self.drain_grace_s >= 0, "drain_grace_s", ">= 0", self.drain_grace_s)
