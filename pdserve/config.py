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
KV_CACHE_DTYPES: tuple[str, ...] = ("auto", "bfloat16", "float32")


def _require(ok: bool, field: str, allowed: str, value: object) -> None:
    if not ok:
        raise ValueError(f"{field} must be {allowed}, got {value!r}")


SPECULATIVE_METHODS: tuple[str, ...] = ("ngram",)


@dataclass(frozen=True)
class SpeculativeConfig:
    """Speculative decoding (vLLM's ``speculative_config``): each step, a greedy request
    past its ``min_tokens`` gets up to ``num_speculative_tokens`` drafts verified in
    the same forward pass as its next token (pdserve/engine/ngram_drafter.py).
    Requests that sample (temperature > 0) are not speculated."""

    num_speculative_tokens: int
    method: str = "ngram"
    """ngram: drafts from the request's own tokens (prompt lookup)."""
    prompt_lookup_max: int | None = None
    """Longest n-gram looked up; None = prompt_lookup_min, or 5 when both are None."""
    prompt_lookup_min: int | None = None
    """Shortest n-gram looked up; None = prompt_lookup_max, or 5 when both are None."""
    disable_by_batch_size: int | None = None
    """No drafts in a step while more requests than this are running: a wide batch is
    compute-bound on a CPU, where drafts cost their full compute (None: always draft)."""

    def __post_init__(self) -> None:
        _require(self.method in SPECULATIVE_METHODS, "speculative_config.method",
                 f"one of {SPECULATIVE_METHODS}", self.method)
        _require(isinstance(self.num_speculative_tokens, int)
                 and 1 <= self.num_speculative_tokens <= 16,
                 "speculative_config.num_speculative_tokens", "an integer in [1, 16]",
                 self.num_speculative_tokens)
        lo = self.prompt_lookup_min if self.prompt_lookup_min is not None else \
            (self.prompt_lookup_max if self.prompt_lookup_max is not None else 5)
        hi = self.prompt_lookup_max if self.prompt_lookup_max is not None else lo
        object.__setattr__(self, "prompt_lookup_min", lo)  # vLLM's defaults, written once
        object.__setattr__(self, "prompt_lookup_max", hi)
        _require(isinstance(lo, int) and isinstance(hi, int) and 1 <= lo <= hi <= 64,
                 "speculative_config.prompt_lookup_min/max", "integers, 1 <= min <= max <= 64",
                 (lo, hi))
        if self.disable_by_batch_size is not None:
            _require(isinstance(self.disable_by_batch_size, int)
                     and self.disable_by_batch_size >= 1,
                     "speculative_config.disable_by_batch_size", "an integer >= 1 or None",
                     self.disable_by_batch_size)

    @classmethod
    def parse(cls, value: SpeculativeConfig | dict[str, object] | None,
              ) -> SpeculativeConfig | None:
        """From a mapping (``LLM(speculative_config={...})``, YAML, JSON on a command
        line): unknown keys are refused by name."""
        if value is None or isinstance(value, SpeculativeConfig):
            return value
        _require(isinstance(value, dict), "speculative_config", "a mapping", value)
        known = set(cls.__dataclass_fields__)
        _require(set(value) <= known, "speculative_config", f"keys among {sorted(known)}",
                 sorted(value))
        _require("num_speculative_tokens" in value, "speculative_config",
                 "a mapping with num_speculative_tokens", value)
        return cls(**value)  # type: ignore[arg-type]


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
    kv_cache_dtype: str = "auto"
    """The KV pool's dtype (vLLM's name): auto (the weights' dtype, so bf16 weights keep
    bf16 KV on a CPU too: half the bytes a decode step's attention reads, widened to
    fp32 as they are read), bfloat16 or float32."""
    decode_step_budget_s: float = 0.0
    """While requests decode, cut prefill chunks so a step lasts about this long (from
    the measured prefill rate and decode step time, pdserve/engine/step_meter.py): a
    prompt prefilled here then delays each running request's next token by at most
    this. 0 = off (chunks fill max_num_batched_tokens)."""
    enable_prefix_caching: bool = True
    """Keep the KV of full blocks after their request finishes and reuse it for any later
    prompt that starts with the same tokens (vLLM's name; see block_manager.py)."""
    quantization: str | None = None
    """Weight quantization (vLLM's name): None (weights in ``dtype``) or int8 (int8 with
    an fp16 scale and zero per group of 32 inputs; activations stay in the compute
    dtype; see pdserve/engine/int8_linear.py). Needs dtype bfloat16 or float32."""
    speculative_config: SpeculativeConfig | None = None
    """Speculative decoding (vLLM's name), or None; a dict is read as a
    SpeculativeConfig, e.g. {"method": "ngram", "num_speculative_tokens": 4}."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "speculative_config",
                           SpeculativeConfig.parse(self.speculative_config))
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
        _require(self.decode_step_budget_s >= 0, "decode_step_budget_s", ">= 0",
                 self.decode_step_budget_s)
        if self.num_threads is not None:
            _require(self.num_threads >= 1, "num_threads", ">= 1", self.num_threads)
        _require(self.kernels in KERNEL_CHOICES, "kernels", f"one of {KERNEL_CHOICES}",
                 self.kernels)
        _require(self.kv_cache_dtype in KV_CACHE_DTYPES, "kv_cache_dtype",
                 f"one of {KV_CACHE_DTYPES}", self.kv_cache_dtype)
        _require(self.quantization is None or self.quantization in QUANTIZATIONS,
                 "quantization", f"None or one of {QUANTIZATIONS}", self.quantization)
        if self.quantization is not None:
            _require(self.dtype in QUANTIZABLE_DTYPES, "quantization",
                     f"used with dtype in {QUANTIZABLE_DTYPES} (dtype={self.dtype!r})",
                     self.quantization)


@dataclass(frozen=True)
class TLSConfig:
    """PEM files for TLS (pdserve/tls.py turns them into credentials). A server needs
    ``cert`` and ``key``; verifying the peer needs ``ca``; a client presents ``cert``
    and ``key`` when it has them (mTLS)."""

    ca: str | None = None
    """CA certificate(s) peers must be signed by."""
    cert: str | None = None
    """This process's certificate chain."""
    key: str | None = None
    """This process's private key."""
    require_client_cert: bool = True
    """Server side: refuse at the handshake a client without a certificate signed by ``ca``.
    Workers always require one; the router's public API only with
    ``--tls-require-client-cert``."""

    def __post_init__(self) -> None:
        _require((self.cert is None) == (self.key is None), "tls_cert/tls_key",
                 "given together", (self.cert, self.key))
        _require(self.ca is not None or self.cert is not None, "tls",
                 "at least tls_ca or tls_cert/tls_key", self)
        if self.require_client_cert:
            _require(self.ca is not None, "tls_ca",
                     "set when client certificates are required", self.ca)

    @property
    def mutual(self) -> bool:
        """CA, certificate and key: enough to serve mTLS and to dial with mTLS."""
        return None not in (self.ca, self.cert, self.key)


def tls_from_args(ca: str | None, cert: str | None, key: str | None,
                  require_client_cert: bool = True) -> TLSConfig | None:
    """The TLS of a command line's --tls-* options; None when none is given."""
    if ca is None and cert is None and key is None:
        return None
    return TLSConfig(ca=ca, cert=cert, key=key, require_client_cert=require_client_cert)


PREFILL_FALLBACKS = ("local", "fail")
KV_SOURCES: tuple[str, ...] = ("grpc", "loopback")
KV_ENCODINGS: tuple[str, ...] = ("model", "fp32", "bf16", "fp16", "int8")  # KVEncoding order


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
    kv_idle_timeout_s: float = 5.0
    """Decode: a prefill worker that sends nothing (header, KV chunk, first token) for
    this long and does not answer its health probe has failed the transfer (one that
    answers gets two more such periods): the next candidate is asked, then the fallback."""
    prefill_fallback: str = "local"  # one of PREFILL_FALLBACKS
    """Decode: when every prefill worker asked failed by its own fault (unreachable,
    died, silent, full), ``local`` prefills here instead; ``fail`` ends the request
    with UNAVAILABLE naming the prefill workers."""
    kv_source: str = "grpc"
    """Decode: where remote KV comes from: ``grpc`` (prefill workers) or ``loopback``
    (an in-process fake prefilling on this worker; tests)."""
    tls: TLSConfig | None = None
    """mTLS on this worker's gRPC port (client certificates signed by ``tls.ca``
    required) and, on a decode worker, on its calls to prefill workers. None = plaintext."""
    prefill_allowlist: tuple[str, ...] = ()
    """Decode: the prefill worker addresses (host:port, as the router names them) this
    worker may dial; a request naming another is refused (PERMISSION_DENIED) without
    dialing. Empty: any address without TLS (plaintext, as before), none with TLS
    (fail closed). ``("*",)``: any address, also with TLS."""
    health_port: int = 0
    """A second, plaintext port serving only grpc.health.v1 (for kubelet's gRPC probes,
    which speak no TLS); 0 = none."""

    def __post_init__(self) -> None:
        _require(self.role in ("prefill", "decode"), "role", "prefill or decode", self.role)
        _require(0 <= self.port < 65536, "port", "in [0, 65535]", self.port)
        _require(0 <= self.metrics_port < 65536, "metrics_port", "in [0, 65535]",
                 self.metrics_port)
        _require(self.kv_encoding in KV_ENCODINGS, "kv_encoding", f"one of {KV_ENCODINGS}",
                 self.kv_encoding)
        _require(self.kv_idle_timeout_s > 0, "kv_idle_timeout_s", "> 0",
                 self.kv_idle_timeout_s)
        _require(self.prefill_fallback in PREFILL_FALLBACKS, "prefill_fallback",
                 f"one of {PREFILL_FALLBACKS}", self.prefill_fallback)
        _require(self.kv_source in KV_SOURCES, "kv_source", f"one of {KV_SOURCES}",
                 self.kv_source)
        if self.tls is not None:
            _require(self.tls.mutual and self.tls.require_client_cert, "tls",
                     "tls_ca, tls_cert and tls_key together (workers serve mTLS only)", self.tls)
        for a in self.prefill_allowlist:
            _require(a == "*" or _is_address(a), "prefill_allowlist",
                     "a list of host:port (or *)", a)
        _require(0 <= self.health_port < 65536, "health_port", "in [0, 65535]",
                 self.health_port)
        _require(self.health_port == 0 or self.health_port != self.port, "health_port",
                 "a port other than port", self.health_port)


def _is_address(a: object) -> bool:
    if not isinstance(a, str) or ":" not in a:
        return False
    port = a.rpartition(":")[2]
    return port.isdigit() and 0 < int(port) < 65536


@dataclass(frozen=True)
class RoleDefaults:
    """What a worker of one role gets unless told otherwise (CLI, cluster YAML, code)."""

    port: int
    metrics_port: int
    """The cluster's default; a worker started by hand serves no metrics unless asked."""
    max_num_batched_tokens: int
    decode_step_budget_s: float


ROLE_DEFAULTS: dict[str, RoleDefaults] = {
    # A prefill worker has no decode batch to keep responsive: whole 2,048-token
    # chunks (bigger GEMMs, and 1.5 MB KV messages instead of 0.4 MB ones).
    "prefill": RoleDefaults(port=50061, metrics_port=9061, max_num_batched_tokens=2048,
                            decode_step_budget_s=0.0),
    # A decode worker that prefills a prompt itself (plan LOCAL) keeps its token
    # streams within 0.1 s a token (the router's cost model counts on it).
    "decode": RoleDefaults(port=50071, metrics_port=9071, max_num_batched_tokens=512,
                           decode_step_budget_s=0.1),
}


ROUTING_POLICIES: tuple[str, ...] = ("cost_model", "load_aware")


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
    policy: str = "cost_model"
    """Routing policy, one of ROUTING_POLICIES: cost_model (decode worker and plan by
    predicted TTFT from the workers' live state, router/cost_model.py) or load_aware
    (the router's own in-flight counts; REMOTE from local_prefill_below tokens on)."""
    local_prefill_below: int = 16
    """Prompts shorter than this are prefilled on the decode worker (plan LOCAL)."""
    local_prefill_stall_s: float = 0.1
    """cost_model: the longest stall a LOCAL prefill may add to a decode worker's
    running requests (its predicted prefill time there)."""
    state_interval_s: float = 0.25
    """Seconds between polls of every worker's live state (WorkerState.GetState)."""
    kv_encodings: tuple[str, ...] = ()
    """cost_model: KV wire encodings it may ask of a prefill worker instead of the
    decode worker's default, per request, where that is predicted to bring the first
    token sooner (the link, not the compute, is the bottleneck); the default wins
    ties. ("int8",): quantize the KV on slow links (lossy, half of bf16's bytes)."""
    max_model_len: int | None = None
    """None = the model's max_position_embeddings."""
    max_prompt_chars: int | None = None
    """Longest prompt (characters, all chat messages together) accepted, checked before
    tokenizing; None = 16 per token of max_model_len."""
    api_key: str | None = None
    """Bearer token required on the public API; None = open."""
    health_interval_s: float = 1.0
    """Seconds between decode worker health probes."""
    drain_grace_s: float = 10.0
    """Seconds in-flight requests get to finish on SIGTERM."""
    request_timeout_s: float = 600.0
    """Deadline of a request that brings none (HTTP, gRPC without one), and the most a
    client's deadline may be: past it the request ends with DEADLINE_EXCEEDED / 504."""
    migration: bool = True
    """A decode worker that dies mid-stream: resubmit the request (prompt plus the
    tokens streamed so far) to another decode worker; the client sees one stream."""
    migration_limit: int = 3
    """The most times one request is moved to another decode worker."""
    tls: TLSConfig | None = None
    """TLS on the public API (gRPC and HTTP; client certificates required only when
    ``tls.require_client_cert``) and mTLS on the router's calls to decode workers
    (its certificate as client certificate). None = plaintext."""
    health_port: int = 0
    """A plaintext port serving only grpc.health.v1 (kubelet probes); 0 = none."""

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
        _require(self.local_prefill_stall_s >= 0, "local_prefill_stall_s", ">= 0",
                 self.local_prefill_stall_s)
        _require(self.state_interval_s > 0, "state_interval_s", "> 0", self.state_interval_s)
        for e in self.kv_encodings:
            _require(e in KV_ENCODINGS[1:], "kv_encodings", f"a list of {KV_ENCODINGS[1:]}",
                     e)
        if self.max_model_len is not None:
            _require(self.max_model_len >= 2, "max_model_len", ">= 2", self.max_model_len)
        if self.max_prompt_chars is not None:
            _require(self.max_prompt_chars >= 1, "max_prompt_chars", ">= 1",
                     self.max_prompt_chars)
        if self.api_key is not None:
            _require(isinstance(self.api_key, str) and bool(self.api_key), "api_key",
                     "a non-empty string or None", self.api_key)
        _require(self.health_interval_s > 0, "health_interval_s", "> 0", self.health_interval_s)
        _require(self.drain_grace_s >= 0, "drain_grace_s", ">= 0", self.drain_grace_s)
        _require(self.request_timeout_s > 0, "request_timeout_s", "> 0",
                 self.request_timeout_s)
        _require(self.migration_limit >= 0, "migration_limit", ">= 0", self.migration_limit)
        if self.tls is not None:
            _require(self.tls.mutual, "tls",
                     "tls_ca, tls_cert and tls_key together (the router dials decode "
                     "workers with mTLS)", self.tls)
        _require(0 <= self.health_port < 65536, "health_port", "in [0, 65535]",
                 self.health_port)


@dataclass(frozen=True)
class RestartPolicy:
    """How the process launcher's supervisor (pdserve/supervisor.py) restarts a role
    whose process exited: after a backoff that doubles per crash, until too many
    crashes in a window."""

    initial_backoff_s: float = 1.0
    max_backoff_s: float = 30.0
    healthy_reset_s: float = 60.0
    """Serving this long resets the backoff to initial_backoff_s."""
    max_crashes: int = 5
    crash_window_s: float = 600.0
    """max_crashes exits within this many seconds: give up on that role (the rest stays up)."""
    start_timeout_s: float = 600.0
    """A restarted process not SERVING by then is killed (a crash)."""

    def __post_init__(self) -> None:
        _require(self.initial_backoff_s > 0, "initial_backoff_s", "> 0", self.initial_backoff_s)
        _require(self.max_backoff_s >= self.initial_backoff_s, "max_backoff_s",
                 ">= initial_backoff_s", self.max_backoff_s)
        _require(self.healthy_reset_s > 0, "healthy_reset_s", "> 0", self.healthy_reset_s)
        _require(self.max_crashes >= 1, "max_crashes", ">= 1", self.max_crashes)
        _require(self.crash_window_s > 0, "crash_window_s", "> 0", self.crash_window_s)
        _require(self.start_timeout_s > 0, "start_timeout_s", "> 0", self.start_timeout_s)
