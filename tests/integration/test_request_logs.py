"""One request id, grepped across the cluster: the router's, the decode worker's and
the prefill worker's stderr each hold JSON lines carrying it (real default model,
process launcher, each role's stderr in its own file)."""

from __future__ import annotations

import json
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pdserve.client import Client
from pdserve.cluster_config import ClusterConfig
from pdserve.logs import FORMAT_ENV
from tests.integration.front_door import running, split_cluster

RID = "grep-me-7f3a91"
ROLES = ("router", "decode", "prefill")
# Well over local_prefill_below (16 tokens): the plan is remote, so all three roles serve it.
PROMPT = ("Explain, in two short sentences, why the sky looks blue on a clear summer afternoon "
          "and why sunsets over the sea often look red or orange instead.")


@pytest.fixture
def cluster(default_model_dir: Path, tmp_path: Path,
            monkeypatch: pytest.MonkeyPatch) -> Iterator[ClusterConfig]:
    monkeypatch.setenv(FORMAT_ENV, "json")  # what `pdserve up --log-format json` sets
    config = split_cluster(default_model_dir, launcher="process", policy="load_aware")
    with running(config, log_dir=tmp_path) as c:
        yield c


def _grep(log_dir: Path, needle: str) -> dict[str, list[dict[str, Any]]]:
    """Per log file (role), the lines containing ``needle``, each parsed as JSON."""
    found: dict[str, list[dict[str, Any]]] = {}
    for f in sorted(log_dir.glob("*.log")):
        lines = [json.loads(line) for line in f.read_text().splitlines() if needle in line]
        found[f.stem.split("-")[0]] = lines
    return found


def _busy(c: ClusterConfig) -> float:
    total = 0.0
    for m in (*c.prefill, *c.decode):
        body = urllib.request.urlopen(f"http://127.0.0.1:{m.metrics_port}/metrics",
                                      timeout=5).read().decode()
        total += sum(float(line.rsplit(" ", 1)[1]) for line in body.splitlines()
                     if line.startswith(("pdserve:kv_cache_usage_perc", "pdserve:num_requests_running",
                                         "pdserve:num_requests_waiting")))
    return total


@pytest.mark.integration
def test_one_request_id_finds_json_lines_from_every_role(cluster: ClusterConfig,
                                                         tmp_path: Path) -> None:
    client = Client(f"127.0.0.1:{cluster.router_port}", timeout=120)
    try:
        deltas = list(client.generate(PROMPT, request_id=RID, max_tokens=8, ignore_eos=True))
    finally:
        client.close()
    assert deltas[-1].request_id == RID and deltas[-1].finish_reason == "length"
    assert deltas[-1].timings["plan"] == "remote"

    deadline = time.monotonic() + 10  # the last lines are written as the request ends
    while {r for r, lines in _grep(tmp_path, RID).items() if lines} != set(ROLES):
        assert time.monotonic() < deadline, f"roles without a line for {RID}: " + str(
            sorted(set(ROLES) - {r for r, lines in _grep(tmp_path, RID).items() if lines}))
        time.sleep(0.1)
    for role, lines in _grep(tmp_path, RID).items():
        assert lines, role
        assert all(line["request_id"] == RID and line["role"] == role for line in lines), lines
        assert all(line["level"] and line["msg"] and line["model"] for line in lines), lines
        print("\n".join(json.dumps(line) for line in lines))  # pytest -s shows the trail

    t0 = time.monotonic()
    while _busy(cluster):  # every block free, no request left on either worker
        assert time.monotonic() - t0 < 5, "a worker still holds the request"
        time.sleep(0.05)
