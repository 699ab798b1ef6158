"""``pdserve up --certs DIR`` on Ray (local instance, tiny model): the actors get the
certificates by path, the launcher's probes use the client certificate, KV crosses
decode <- prefill over mTLS, and a client without a CA-signed certificate is refused."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import grpc
import pytest

from pdserve.certs import write_certs
from pdserve.client import Client
from pdserve.config import TLSConfig
from tests.integration.ray_helpers import cluster_yaml
from tests.integration.test_ray_up import Up

REPO = Path(__file__).resolve().parents[2]


def test_up_on_ray_with_certs_serves_over_mtls(tiny_llama: Path, tmp_path: Path) -> None:
    certs = write_certs(tmp_path / "pki")
    config = cluster_yaml(tmp_path / "cluster.yaml", tiny_llama, http_port=0, pin="off")
    ray_dir = tempfile.mkdtemp(prefix="pdray-", dir="/tmp")  # short: Ray's socket paths
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_TMPDIR": ray_dir}
    proc = subprocess.Popen([sys.executable, "-m", "pdserve.cli", "up", "--config",
                             str(tmp_path / "cluster.yaml"), "--certs", str(certs.directory)],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    router = f"127.0.0.1:{config['router_port']}"
    decode = f"127.0.0.1:{config['decode'][0]['port']}"  # type: ignore[index]
    try:
        Up(config, proc, ray_dir).wait_for("Ctrl-C stops the cluster", timeout=300)
        client = Client(router, timeout=60, tls=certs.tls("client"))
        deltas = list(client.generate("hello there, a prompt", max_tokens=4, ignore_eos=True))
        client.close()
        assert sum(len(d.token_ids) for d in deltas) == 4
        assert deltas[-1].timings["plan"] == "remote" and deltas[-1].timings["kv_bytes"] > 0
        bare = Client(decode, timeout=10, tls=TLSConfig(ca=str(certs.ca),
                                                        require_client_cert=False))
        with pytest.raises(grpc.RpcError) as e:
            bare.is_serving()
        bare.close()
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE  # type: ignore[attr-defined]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGINT)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        shutil.rmtree(ray_dir, ignore_errors=True)

