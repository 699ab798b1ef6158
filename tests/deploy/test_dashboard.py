"""The Grafana dashboard queries only metrics pdserve (or the DCGM exporter) exports.

Every PromQL expression is parsed with a real PromQL parser (promql-parser);
every metric it selects must be a scraped name of a metric in
pdserve.metrics.METRIC_NAMES / GPU_METRIC_NAMES, and every metric there is on
some panel. The workers' real registry exports only listed names.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import promql_parser
import pytest
from prometheus_client import generate_latest

from pdserve.metrics import GPU_METRIC_NAMES, METRIC_NAMES, WorkerMetrics
from tests.deploy.manifests import ROOT

DASHBOARD = ROOT / "deploy" / "grafana" / "pdserve-dashboard.json"
SUFFIXES = {"histogram": ("_bucket", "_sum", "_count"), "counter": ("",), "gauge": ("",)}
# Grafana's variables, replaced by values PromQL accepts before parsing.
GRAFANA_VARS = {"$__rate_interval": "5m", "$model_name": ".*", "$role": ".*", "$node": ".*"}


def scraped(names: dict[str, str]) -> dict[str, str]:
    """Scraped series name -> the listed metric it belongs to."""
    return {n + s: n for n, kind in names.items() for s in SUFFIXES[kind]}


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def expressions(d: dict[str, Any]) -> Iterator[tuple[str, str]]:
    for panel in d["panels"]:
        for target in panel.get("targets", []):
            yield panel["title"], target["expr"]
    for var in d["templating"]["list"]:
        if var["type"] == "query":
            label_values = re.fullmatch(r"label_values\((.+), *\w+\)", var["query"]["query"])
            assert label_values, var["name"]
            yield f"variable {var['name']}", label_values.group(1)


def selected_metrics(expr: str) -> set[str]:
    for var, value in GRAFANA_VARS.items():
        expr = expr.replace(var, value)
    found: set[str] = set()

    def walk(node: Any) -> None:
        if isinstance(node, promql_parser.VectorSelector):
            assert node.name, f"selector without a metric name in {expr}"
            found.add(node.name)
            return
        for attr in ("expr", "lhs", "rhs", "param", "vector_selector"):
            child = getattr(node, attr, None)
            if child is not None:
                walk(child)
        for child in getattr(node, "args", None) or []:
            walk(child)

    walk(promql_parser.parse(expr))
    return found


def test_every_query_parses_and_uses_only_known_metrics() -> None:
    known = scraped({**METRIC_NAMES, **GPU_METRIC_NAMES})
    used: set[str] = set()
    for where, expr in expressions(dashboard()):
        names = selected_metrics(expr)
        assert names, f"{where}: no metric in {expr}"
        unknown = names - known.keys()
        assert not unknown, f"{where}: {sorted(unknown)} not in pdserve.metrics"
        used |= {known[n] for n in names}
    missing = set(METRIC_NAMES) | set(GPU_METRIC_NAMES)
    assert not missing - used, f"metrics with no panel: {sorted(missing - used)}"


@pytest.mark.parametrize("expr", [
    "rate(pdserve:kv_transfer_bytes[5m])",          # counter without _total
    "pdserve:time_to_first_token_seconds",          # histogram without _bucket/_sum/_count
    "sum(rate(pdserve:tokens_total[5m]))",          # not a pdserve metric
])
def test_a_wrong_metric_name_is_caught(expr: str) -> None:
    assert selected_metrics(expr) - scraped({**METRIC_NAMES, **GPU_METRIC_NAMES}).keys()


def test_a_broken_query_is_caught() -> None:
    with pytest.raises(ValueError):
        selected_metrics("sum(rate(pdserve:prompt_tokens_total[$__rate_interval])")


def test_panels_are_well_formed() -> None:
    d = dashboard()
    ids = [p["id"] for p in d["panels"]]
    assert len(ids) == len(set(ids))
    variables = {v["name"] for v in d["templating"]["list"]}
    for panel in d["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs)), panel["title"]
        for t in panel["targets"]:
            used = set(re.findall(r"\$(\w+)", t["expr"])) - {"__rate_interval"}
            assert used <= variables, (panel["title"], used - variables)
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24


def test_workers_export_only_listed_metrics() -> None:
    metrics = WorkerMetrics("m", "prefill")
    metrics.watch(lambda: 1, lambda: 0, lambda: 0.5)
    metrics.kv_seconds.observe(0.01)
    text = generate_latest(metrics.registry).decode()
    exported = {line.split("{")[0].split(" ")[0] for line in text.splitlines()
                if line and not line.startswith("#")}
    known = scraped(METRIC_NAMES)
    # prometheus_client also exports a *_created series next to each counter/histogram.
    unknown = {n for n in exported if n not in known and not n.endswith("_created")}
    assert exported and not unknown, sorted(unknown)


def test_worker_metrics_keep_their_names_when_prometheus_asks_for_openmetrics() -> None:
    """A real Prometheus asks for OpenMetrics first; prometheus_client would answer with
    ``pdserve_`` names, which no dashboard query matches."""
    import socket
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    metrics = WorkerMetrics("m", "decode")
    metrics.watch(lambda: 1, lambda: 0, lambda: 0.5)
    metrics.serve("127.0.0.1", port)
    accept = ("application/openmetrics-text;version=1.0.0,application/openmetrics-text;"
              "version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1")
    req = urllib.request.Request(f"http://127.0.0.1:{port}/metrics", headers={"Accept": accept})
    with urllib.request.urlopen(req, timeout=5) as r:
        body = r.read().decode()
        assert r.headers["Content-Type"].startswith("text/plain;")  # not OpenMetrics
    assert 'pdserve:kv_cache_usage_perc{model_name="m",role="decode"} 0.5' in body
    assert "pdserve_" not in body
