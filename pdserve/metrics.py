"""Prometheus metrics of every role (names from DESIGN §7, prefix ``pdserve:``)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, Metric

from pdserve.gpu_metrics import register_gpu_metrics

LABELS = ("model_name", "role")
_TRANSFER_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
# vLLM's buckets, so dashboards built for it read ours the same way.
_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5,
                 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
_ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0,
                7.5, 10.0, 20.0, 40.0, 80.0)
_E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
                60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
_QUEUE_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                  60.0, 120.0)

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
    "pdserve:prefix_cache_queries_total": "counter",
    "pdserve:prefix_cache_hits_total": "counter",
    "pdserve:kv_transfer_seconds": "histogram",
    "pdserve:kv_transfer_bytes_total": "counter",
    "pdserve:kv_transfer_failures_total": "counter",
    "pdserve:requests_aborted_total": "counter",
    "pdserve:num_preemptions_total": "counter",
    "pdserve:request_migrations_total": "counter",
    "pdserve:spec_decode_num_drafts_total": "counter",
    "pdserve:spec_decode_num_draft_tokens_total": "counter",
    "pdserve:spec_decode_num_accepted_tokens_total": "counter",
}
# GPU gauges under the DCGM exporter's names (from dcgm-exporter, or from pdserve's
# own nvidia-ml-py gauges that reuse those names).
GPU_METRIC_NAMES: dict[str, str] = {
    "DCGM_FI_DEV_GPU_UTIL": "gauge",  # percent, 0-100
    "DCGM_FI_DEV_FB_USED": "gauge",  # framebuffer memory used, MiB
    "DCGM_FI_DEV_FB_FREE": "gauge",  # framebuffer memory free, MiB
    "DCGM_FI_DEV_POWER_USAGE": "gauge",  # watts
}


class _RoleMetrics:
    """What every role counts: tokens, aborts, running and waiting requests."""

    def __init__(self, model_name: str, role: str) -> None:
        self.registry = CollectorRegistry()
        self._labels = (model_name, role)
        self.aborted = self._counter("requests_aborted", "Requests cancelled or failed")
        self.prompt_tokens = self._counter("prompt_tokens", "Prompt tokens prefilled")
        self.generation_tokens = self._counter("generation_tokens", "Tokens generated")
        self._gauges = {
            name: Gauge(f"pdserve:{name}", doc, LABELS, registry=self.registry).labels(*self._labels)
            for name, doc in self._gauge_docs()
        }

    def _gauge_docs(self) -> list[tuple[str, str]]:
        return [("num_requests_running", "Requests in the running batch"),
                ("num_requests_waiting", "Requests waiting for KV blocks")]

    def _counter(self, name: str, doc: str) -> Counter:
        return Counter(f"pdserve:{name}", doc, LABELS, registry=self.registry).labels(*self._labels)

    def _histogram(self, name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
        return Histogram(f"pdserve:{name}", doc, LABELS, buckets=buckets,
                         registry=self.registry).labels(*self._labels)

    def serve(self, host: str, port: int) -> None:
        """GET (any path) on ``port``: the registry in Prometheus' text format, as
        the router's /metrics. Not prometheus_client's server: it answers a Prometheus
        that asks for OpenMetrics with every ``pdserve:`` name escaped to ``pdserve_``,
        which no dashboard query matches."""
        if not port:
            return
        registry = self.registry

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                body = generate_latest(registry)
                self.send_response(200)
                self.send_header("Content-Type", CONTENT_TYPE_LATEST)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002
                pass  # a scrape a second would flood the worker's log

        server = ThreadingHTTPServer((host, port), Handler)
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()


class WorkerMetrics(_RoleMetrics):
    def __init__(self, model_name: str, role: str) -> None:
        super().__init__(model_name, role)
        self.kv_bytes = self._counter("kv_transfer_bytes", "KV bytes sent (prefill) or "
                                      "received (decode)")
        self.kv_seconds = self._histogram("kv_transfer_seconds", "First to last KV byte of one "
                                          "request", _TRANSFER_BUCKETS)
        self.kv_failures = self._counter("kv_transfer_failures", "KV streams that failed")
        self.preemptions = self._counter("num_preemptions", "Requests preempted (blocks freed, "
                                         "KV recomputed later)")
        self.engine_counters = _EngineCounters(self._labels)
        self.registry.register(self.engine_counters)
        self.gpu = register_gpu_metrics(self.registry)

    def _gauge_docs(self) -> list[tuple[str, str]]:
        return [*super()._gauge_docs(),
                ("kv_cache_usage_perc", "Share of KV blocks in use (0-1)")]

    def watch(self, running: Callable[[], float], waiting: Callable[[], float],
              usage: Callable[[], float],
              engine_counters: Callable[[], Mapping[str, int]] | None = None) -> None:
        """Gauges (and the engine's counters, ``ENGINE_COUNTERS`` by name) read live
        engine state at scrape time."""
        self._gauges["num_requests_running"].set_function(running)
        self._gauges["num_requests_waiting"].set_function(waiting)
        self._gauges["kv_cache_usage_perc"].set_function(usage)
        if engine_counters is not None:
            self.engine_counters.read = engine_counters


# Counters the engine thread keeps itself (vLLM's names and units); a scrape reads
# their running totals.
ENGINE_COUNTERS: dict[str, str] = {
    "prefix_cache_queries": "Prompt tokens looked up in the prefix cache",
    "prefix_cache_hits": "Prompt tokens found in the prefix cache",
    "spec_decode_num_drafts": "Decode steps of a request that carried draft tokens",
    "spec_decode_num_draft_tokens": "Draft tokens verified",
    "spec_decode_num_accepted_tokens": "Draft tokens accepted",
}


class _EngineCounters:
    def __init__(self, labels: tuple[str, str]) -> None:
        self._labels = list(labels)
        self.read: Callable[[], Mapping[str, int]] = dict

    def collect(self) -> Iterator[Metric]:
        values = self.read()
        for name, doc in ENGINE_COUNTERS.items():
            family = CounterMetricFamily(f"pdserve:{name}", doc, labels=list(LABELS))
            family.add_metric(self._labels, values.get(name, 0))
            yield family


class RouterMetrics(_RoleMetrics):
    """Seen from the front door: latencies as the client sees them, minus the network."""

    def __init__(self, model_name: str) -> None:
        super().__init__(model_name, "router")
        self.ttft = self._histogram("time_to_first_token_seconds", "Arrival at the router to "
                                    "the first token relayed", _TTFT_BUCKETS)
        self.itl = self._histogram("inter_token_latency_seconds", "Gap between consecutive "
                                   "token messages of one request", _ITL_BUCKETS)
        self.e2e = self._histogram("e2e_request_latency_seconds", "Arrival at the router to "
                                   "the last token", _E2E_BUCKETS)
        self.queue = self._histogram("request_queue_time_seconds", "Arrival at the router to "
                                     "dispatch to the decode worker that serves it",
                                     _QUEUE_BUCKETS)
        self.migrations = self._counter(
            "request_migrations", "Requests moved to another decode worker after theirs died "
            "(cf. Dynamo model_migration_total)")

    def watch(self, running: Callable[[], float], waiting: Callable[[], float]) -> None:
        self._gauges["num_requests_running"].set_function(running)
        self._gauges["num_requests_waiting"].set_function(waiting)
