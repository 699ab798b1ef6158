"""The RayService's Serve application on a local Ray instance.

The serveConfigV2 of deploy/k8s/kuberay/service/rayservice.yaml is deployed the way
KubeRay's call to the dashboard deploys it (``serve_start`` with the config's
``http_options``, then ``deploy_apps``: the Serve controller imports
``deploy.ray.serve:app`` and calls it with the manifest's ``args``). Only the config
path (a small float32 cluster on free ports) and Serve's HTTP address (a free port on
127.0.0.1) differ. An OpenAI chat completion through Serve's proxy, plain and
streamed, must answer; deleting the application must stop every pdserve process it
started, and shutting Serve and Ray down must leave nothing behind. Errors come back
as the router sends them, and a client that leaves mid-stream frees the KV blocks."""

from __future__ import annotations

import json
import shutil
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.integration.ray_helpers import blocks_free, cluster_yaml, free_port, pids_with
from tests.integration.test_ray_up import _alive, _all_pids, _cmdline

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")

REPO = Path(__file__).resolve().parents[2]
MANIFEST = REPO / "deploy" / "k8s" / "kuberay" / "service" / "rayservice.yaml"
APP = "pdserve"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture
def local_ray(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """Resources as KubeRay's head and worker groups offer them; 1 CPU: Serve's
    actors and pdserve's actors ask for none."""
    ray_dir = tempfile.mkdtemp(prefix="pdray-", dir="/tmp")  # short: Ray's socket paths
    monkeypatch.setenv("PYTHONPATH", str(REPO))  # role processes import this checkout
    ray.init(namespace="pdserve-serve-test", num_cpus=1, include_dashboard=False,
             resources={"pdserve_router": 1, "pdserve_prefill": 1, "pdserve_decode": 1},
             object_store_memory=128 * 1024 * 1024, _temp_dir=ray_dir)
    try:
        yield ray_dir
    finally:
        serve.shutdown()
        ray.shutdown()
        deadline = time.monotonic() + 30
        while left := [p for p in _all_pids() if ray_dir in _cmdline(p) and _alive(p)]:
            assert time.monotonic() < deadline, f"Ray processes left: {left}"
            time.sleep(0.5)
        shutil.rmtree(ray_dir, ignore_errors=True)


def serve_config(cluster: Path, http_port: int) -> dict[str, Any]:
    config: dict[str, Any] = yaml.safe_load(
        yaml.safe_load(MANIFEST.read_text())["spec"]["serveConfigV2"])
    app = next(a for a in config["applications"] if a["name"] == APP)
    assert app["import_path"] == "deploy.ray.serve:app"
    assert set(app["args"]) == {"config"}
    app["args"]["config"] = str(cluster)
    config["http_options"] = {**config.get("http_options", {}), "host": "127.0.0.1",
                              "port": http_port}
    return config


def wait_running(timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while (app := serve.status().applications.get(APP)) is None or app.status != "RUNNING":
        assert app is None or app.status not in ("DEPLOY_FAILED", "UNHEALTHY"), app.message
        assert time.monotonic() < deadline, f"not RUNNING within {timeout} s: {app}"
        time.sleep(1)


def http(url: str, body: dict[str, Any] | None = None) -> tuple[int, str, bytes]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return r.status, r.headers.get("Content-Type", ""), r.read()


def check_chat(base: str) -> None:
    """/health, /v1/models, and one greedy chat completion, plain then streamed."""
    assert http(f"{base}/health")[0] == 200
    models = json.loads(http(f"{base}/v1/models")[2])
    ask = {"messages": QUESTION, "max_tokens": 30, "temperature": 0}
    status, kind, body = http(f"{base}/v1/chat/completions", ask)
    answer = json.loads(body)["choices"][0]["message"]["content"]
    assert status == 200 and kind.startswith("application/json") and "Paris" in answer, body
    status, kind, body = http(f"{base}/v1/chat/completions", {**ask, "stream": True})
    events = [line.removeprefix(b"data: ") for line in body.splitlines() if line]
    assert status == 200 and kind.startswith("text/event-stream") and events[-1] == b"[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert {c["model"] for c in chunks} == {models["data"][0]["id"]}
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks) == answer


def check_error_and_disconnect(base: str, metrics: tuple[int, int]) -> None:
    """The router's errors come back as it sends them; a client that goes away
    mid-stream cancels the request on the workers."""
    with pytest.raises(urllib.error.HTTPError) as e:
        http(f"{base}/v1/chat/completions", {"messages": QUESTION, "max_tokens": -1})
    assert e.value.code == 400 and json.loads(e.value.read())["error"]["param"] == "max_tokens"
    long = {"messages": QUESTION, "max_tokens": 4000, "ignore_eos": True, "stream": True}
    with urllib.request.urlopen(urllib.request.Request(
            f"{base}/v1/chat/completions", data=json.dumps(long).encode(),
            headers={"Content-Type": "application/json"}), timeout=60) as r:
        assert r.readline().startswith(b"data: ")
        assert not blocks_free(*metrics, timeout=0.5)  # generating (for minutes if left)
    assert blocks_free(*metrics, timeout=5)


@pytest.mark.integration
def test_rayservice_app_answers_openai_over_serve_and_stops_its_cluster(
        local_ray: str, default_model_dir: Path, tmp_path: Path) -> None:
    from ray.serve._private.api import serve_start
    from ray.serve.schema import ServeDeploySchema

    c = cluster_yaml(tmp_path / "cluster.yaml", default_model_dir)
    port = free_port()
    config = ServeDeploySchema.model_validate(serve_config(tmp_path / "cluster.yaml", port))
    client = serve_start(http_options=config.http_options.model_dump(),
                         proxy_location=config.proxy_location)
    client.deploy_apps(config)
    wait_running(timeout=240)
    check_chat(f"http://127.0.0.1:{port}")
    prefill, decode = c["prefill"][0], c["decode"][0]  # type: ignore[index]
    check_error_and_disconnect(f"http://127.0.0.1:{port}",
                               (prefill["metrics_port"], decode["metrics_port"]))

    roles = (pids_with("router", str(c["router_port"])) +
             pids_with("prefill_worker", str(prefill["port"])) +
             pids_with("decode_worker", str(decode["port"])))
    assert len(roles) == 3
    serve.delete(APP)  # Serve drains the replica and calls its __del__
    deadline = time.monotonic() + 30
    while alive := [p for p in roles if _alive(p)]:
        assert time.monotonic() < deadline, f"pdserve processes left after serve.delete: {alive}"
        time.sleep(0.2)
    logs = "".join(p.read_text(errors="replace")
                   for p in Path(local_ray).glob("session_*/logs/serve/replica_*PDServe*"))
    assert "pdserve cluster stopped" in logs  # stopped by the launcher, not by Ray killing it
    named = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)]
    assert not [n for n in named if n.startswith("pdserve-")], named  # registry, roles gone
