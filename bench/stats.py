"""Serving metrics with the definitions of ``vllm bench serve``.

TTFT = send → first streamed chunk that carries output; TPOT per request =
(E2E − TTFT)/(output tokens − 1), only for requests with more than one output
token; ITL = every gap between consecutive content chunks, pooled over requests
(a chunk that carries k tokens is one gap, as vLLM counts it); E2E = send → last
content chunk. Percentiles interpolate linearly (numpy's default, as vLLM).
Goodput = completed requests per second whose TTFT and TPOT both meet the SLOs
(a one-token request has TPOT 0, as in vLLM).
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

PERCENTILES = (50, 90, 99)


@dataclass
class RequestRecord:
    """What one streamed request did; times in seconds."""

    rid: str
    cls: str
    prompt_len: int
    max_tokens: int
    start_s: float = 0.0
    """Send time, from the start of the run."""
    ttft_s: float = 0.0
    e2e_s: float = 0.0
    chunk_times_s: list[float] = field(default_factory=list)
    """Arrival of every content chunk, from the start of the run."""
    output_tokens: int = 0
    success: bool = False
    error: str = ""
    plan: str = ""
    """pdserve targets: local or remote, the router's predicted TTFT (0: none) and the
    KV bytes the decode worker received for it."""
    predicted_ttft_s: float = 0.0
    kv_bytes: int = 0

    @property
    def itl_s(self) -> list[float]:
        t = self.chunk_times_s
        return [b - a for a, b in zip(t, t[1:], strict=False)]


@dataclass(frozen=True)
class SLO:
    ttft_s: float | None = None
    tpot_s: float | None = None

    @property
    def active(self) -> bool:
        return self.ttft_s is not None or self.tpot_s is not None


def tpot(rec: RequestRecord) -> float | None:
    if rec.output_tokens <= 1:
        return None
    return (rec.e2e_s - rec.ttft_s) / (rec.output_tokens - 1)


def percentile(values: Sequence[float], p: float) -> float | None:
    return float(np.percentile(values, p)) if len(values) else None


def distribution(values: Sequence[float]) -> dict[str, float | None]:
    """Mean, p50/p90/p99 and max in milliseconds (None when there are no values). The
    max matters for pooled ITLs: a few prefill stalls among thousands of gaps stay
    below p99."""
    out: dict[str, float | None] = {"mean": 1e3 * statistics.fmean(values) if values else None}
    for p in PERCENTILES:
        v = percentile(values, p)
        out[f"p{p}"] = None if v is None else 1e3 * v
    out["max"] = 1e3 * max(values) if len(values) else None
    return out


def is_good(rec: RequestRecord, slo: SLO) -> bool:
    if slo.ttft_s is not None and rec.ttft_s > slo.ttft_s:
        return False
    t = tpot(rec) or 0.0
    return not (slo.tpot_s is not None and t > slo.tpot_s)


def summarize(records: Iterable[RequestRecord], duration_s: float,
              slo: SLO = SLO()) -> dict[str, Any]:
    recs = list(records)
    ok = [r for r in recs if r.success]
    tpots = [t for t in map(tpot, ok) if t is not None]
    out_tokens = sum(r.output_tokens for r in ok)
    summary: dict[str, Any] = {
        "completed": len(ok), "failed": len(recs) - len(ok), "duration_s": duration_s,
        "output_tokens": out_tokens,
        "request_throughput": len(ok) / duration_s if duration_s > 0 else 0.0,
        "output_throughput": out_tokens / duration_s if duration_s > 0 else 0.0,
        "ttft_ms": distribution([r.ttft_s for r in ok]),
        "tpot_ms": distribution(tpots),
        "itl_ms": distribution([g for r in ok for g in r.itl_s]),
        "e2e_ms": distribution([r.e2e_s for r in ok]),
        "decode_tok_s": 1.0 / statistics.median(tpots) if tpots else None,
        "goodput": None,
    }
    if slo.active and duration_s > 0:
        summary["goodput"] = sum(is_good(r, slo) for r in ok) / duration_s
    plans = [r.plan for r in ok if r.plan]
    if plans:
        summary["plans"] = {p: plans.count(p) for p in sorted(set(plans))}
    remote = [r for r in ok if r.kv_bytes > 0]
    if remote:  # the wire encoding a remote prompt took shows in its bytes per token
        per_token = [r.kv_bytes / r.prompt_len for r in remote]
        summary["kv"] = {"requests": len(remote), "bytes": sum(r.kv_bytes for r in remote),
                         "bytes_per_token_min": min(per_token),
                         "bytes_per_token_max": max(per_token)}
    errors = [abs(r.predicted_ttft_s - r.ttft_s) / r.ttft_s
              for r in ok if r.predicted_ttft_s > 0 and r.ttft_s > 0]
    if errors:  # the router's cost model: |predicted - actual| / actual TTFT
        summary["ttft_prediction_error"] = {
            "n": len(errors), "p50": percentile(errors, 50), "p90": percentile(errors, 90)}
    return summary


def median_of(summaries: Sequence[Any]) -> Any:
    """Element-wise median of several summaries with the same shape (repeats)."""
    first = summaries[0]
    if isinstance(first, dict):
        return {k: median_of([s[k] for s in summaries]) for k in first}
    numbers = [s for s in summaries if isinstance(s, int | float) and not isinstance(s, bool)]
    return statistics.median(numbers) if numbers else first
