"""The Grafana dashboard against a real Prometheus: `pdserve up` (process launcher, the
real model) serves traffic, Prometheus (Debian's package, which `make install` adds
where it can) scrapes the router and both workers every second, and every PromQL query
of deploy/grafana/pdserve-dashboard.json must return data, a number wherever the
traffic moved its metric."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pdserve.client import Client
from pdserve.cluster_config import ClusterConfig
from tests.integration.front_door import free_port, running, split_cluster

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "pdserve-dashboard.json"
RATE_WINDOW = "30s"  # $__rate_interval: 30 one-second scrapes
# Panels whose queries have no number to show in this run: no GPU here, speculative
# decoding off (0 / 0), and counters the traffic does not move still return 0.
NO_GPU = "DCGM_FI_DEV"
MAY_BE_NAN = ("spec_decode",)

pytestmark = pytest.mark.skipif(
    shutil.which("prometheus") is None,
    reason="no prometheus binary: `make install` installs Debian's package where apt-get "
           "and root are available (apt-get install prometheus)")


@pytest.fixture(scope="module")
def cluster(default_model_dir: Path) -> Iterator[ClusterConfig]:
    with running(split_cluster(default_model_dir, http_port=free_port(), launcher="process",
                               local_prefill_below=1, policy="load_aware")) as c:
        yield c


@pytest.fixture(scope="module")
def prometheus(cluster: ClusterConfig, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    d = tmp_path_factory.mktemp("prometheus")
    targets = [f"127.0.0.1:{cluster.http_port}", f"127.0.0.1:{cluster.prefill[0].metrics_port}",
               f"127.0.0.1:{cluster.decode[0].metrics_port}"]
    (d / "prometheus.yml").write_text(json.dumps({  # YAML is a superset of JSON
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "scrape_configs": [{"job_name": "pdserve", "static_configs": [{"targets": targets}]}]}))
    port = free_port()
    proc = subprocess.Popen(
        ["prometheus", f"--config.file={d / 'prometheus.yml'}",
         f"--storage.tsdb.path={d / 'data'}", f"--web.listen-address=127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL, stderr=(d / "prometheus.log").open("w"))
    url = f"http://127.0.0.1:{port}"
    try:
        _wait(lambda: _targets_up(url) == len(targets), 60, "prometheus scraping every target")
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _wait(ok: Any, within_s: float, what: str) -> None:
    deadline = time.monotonic() + within_s
    while not ok():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)


def _get(url: str) -> Any:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return json.loads(r.read())
    except OSError:
        return None


def _targets_up(url: str) -> int:
    doc = _get(f"{url}/api/v1/targets")
    if not doc:
        return 0
    return sum(t["health"] == "up" for t in doc["data"]["activeTargets"])


def _queries() -> list[tuple[str, str]]:
    """(panel title, PromQL) of every dashboard query, its variables filled in."""
    doc = json.loads(DASHBOARD.read_text())
    out = []
    for panel in doc["panels"]:
        for t in panel.get("targets", []):
            expr = (t["expr"].replace("$__rate_interval", RATE_WINDOW)
                    .replace("$model_name", ".*").replace("$role", ".*").replace("$node", ".*"))
            out.append((panel["title"], expr))
    return out


def _values(url: str, expr: str) -> list[float] | None:
    doc = _get(f"{url}/api/v1/query?{urllib.parse.urlencode({'query': expr})}")
    if not doc or doc.get("status") != "success":
        return None
    return [float(sample["value"][1]) for sample in doc["data"]["result"]]


@pytest.mark.integration
def test_every_dashboard_query_returns_data_from_a_real_prometheus(
        cluster: ClusterConfig, prometheus: str) -> None:
    client = Client(f"127.0.0.1:{cluster.router_port}", timeout=120)
    try:
        for i in range(4):  # remote prompts (KV transfers), the first one twice (a cache hit)
            prompt = list(range(3000 + 40 * (i % 3), 3040 + 40 * (i % 3)))
            list(client.generate(prompt, max_tokens=6, ignore_eos=True))
    finally:
        client.close()
    queries = [(title, expr) for title, expr in _queries() if NO_GPU not in expr]
    assert len(queries) >= 20

    def missing() -> list[str]:
        bad = []
        for title, expr in queries:
            values = _values(prometheus, expr)
            numbers = [v for v in values or [] if not math.isnan(v)]
            if values is None or not values or \
                    (not numbers and not any(m in expr for m in MAY_BE_NAN)):
                bad.append(f"{title}: {expr[:90]} -> {values}")
        return bad

    deadline = time.monotonic() + 30  # a few scrapes for rate() to see two samples
    while (bad := missing()) and time.monotonic() < deadline:
        time.sleep(1)
    assert not bad, "\n".join(bad)
