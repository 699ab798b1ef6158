"""Prometheus metrics of every role (names from DESIGN §7, prefix ``pdserve:``)."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

LABELS = ("model_name", "role")
_TRANSFER_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)

# Every metric a pdserve process may export (DESIGN §7), by the name Prometheus
# scrapes and its type: counters carry ``_total``; a histogram X is scraped as
# X_bucket, X_sum and X_count. Dashboards and alerts are checked against this list
# (tests/deploy/test_dashboard.py), and so are the registries that export them.
METRIC_NAMES: dict[str, str] = {
    "pdserve:time_to_first_token_seconds": "histogram",
    "pdserve:inter_token_latency_seconds": "histogram",
    "pdserve:e2e_request_latency_seconds": "histogram",
    "pdserve:request_queue_time_seconds": "histogram",
    "pdserve:num_requests_running": "gauge",
    "pdserve:num_requests_waiting": "gauge",
    "pdserve:kv_cache_usage_perc": "gauge",
    "pdserve:prompt_tokens_total": "counter",
    "pdserve:generation_tokens_total": "counter",
    "pdserve:prefix_cache_hits_total": "counter",
    "pdserve:kv_transfer_seconds": "histogram",
    "pdserve:kv_transfer_bytes_total": "counter",
    "pdserve:kv_transfer_failures_total": "counter",
    "pdserve:requests_aborted_total": "counter",
}
# GPU gauges under the DCGM exporter's names (from dcgm-exporter, or from pdserve's
# own nvidia-ml-py gauges that reuse those names).
GPU_METRIC_NAMES: dict[str, str] = {
    "DCGM_FI_DEV_GPU_UTIL": "gauge",  # percent, 0-100
    "DCGM_FI_DEV_FB_USED": "gauge",  # framebuffer memory used, MiB
}


class WorkerMetrics:
    def __init__(self, model_name: str, role: str) -> None:
        self.registry = CollectorRegistry()
        r, labels = self.registry, (model_name, role)
        self.kv_bytes = Counter("pdserve:kv_transfer_bytes", "KV bytes sent (prefill) or "
                                "received (decode)", LABELS, registry=r).labels(*labels)
        self.kv_seconds = Histogram("pdserve:kv_transfer_seconds", "First to last KV byte of "
                                    "one request", LABELS, buckets=_TRANSFER_BUCKETS,
                                    registry=r).labels(*labels)
        self.kv_failures = Counter("pdserve:kv_transfer_failures", "KV streams that failed",
                                   LABELS, registry=r).labels(*labels)
        self.aborted = Counter("pdserve:requests_aborted", "Requests cancelled or failed",
                               LABELS, registry=r).labels(*labels)
        self.prompt_tokens = Counter("pdserve:prompt_tokens", "Prompt tokens prefilled",
                                     LABELS, registry=r).labels(*labels)
        self.generation_tokens = Counter("pdserve:generation_tokens", "Tokens generated",
                                         LABELS, registry=r).labels(*labels)
        self._gauges = {
            name: Gauge(f"pdserve:{name}", doc, LABELS, registry=r).labels(*labels)
            for name, doc in [("num_requests_running", "Requests in the running batch"),
                              ("num_requests_waiting", "Requests waiting for KV blocks"),
                              ("kv_cache_usage_perc", "Share of KV blocks in use (0-1)")]
        }

    def watch(self, running: Callable[[], float], waiting: Callable[[], float],
              usage: Callable[[], float]) -> None:
        """Gauges read live engine state at scrape time."""
        self._gauges["num_requests_running"].set_function(running)
        self._gauges["num_requests_waiting"].set_function(waiting)
        self._gauges["kv_cache_usage_perc"].set_function(usage)

    def serve(self, host: str, port: int) -> None:
        if port:
            start_http_server(port, addr=host, registry=self.registry)
