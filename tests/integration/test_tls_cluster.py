"""``pdserve up --certs DIR`` (process launcher, tiny model): mTLS on every hop, real
processes on free ports. The router's public API requires client certificates
here (``tls_require_client_cert``); KV crosses decode -> prefill (remote plan)."""

from __future__ import annotations

import signal
import ssl
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import grpc
import pytest
import yaml

from pdserve.certs import CertFiles, write_certs
from pdserve.client import Client
from pdserve.config import TLSConfig
from pdserve.launch import wait_serving
from pdserve.tls import client_ssl_context
from tests.integration.front_door import free_port


@dataclass
class TLSCluster:
    certs: CertFiles
    router: str
    http_port: int
    decode: str
    prefill: str


@pytest.fixture(scope="module")
def cluster(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TLSCluster]:
    d = tmp_path_factory.mktemp("tls-cluster")
    certs = write_certs(d / "pki")
    ports = {k: free_port() for k in ("router", "http", "prefill", "decode")}
    (d / "cluster.yaml").write_text(yaml.safe_dump({
        "model": str(tiny_llama), "dtype": "float32", "launcher": "process", "pin": "off",
        "router_port": ports["router"], "http_port": ports["http"], "local_prefill_below": 1,
        "policy": "load_aware",
        "tls_require_client_cert": True,
        "prefill": [{"port": ports["prefill"]}], "decode": [{"port": ports["decode"]}]}))
    proc = subprocess.Popen([sys.executable, "-m", "pdserve.cli", "up", "--config",
                             str(d / "cluster.yaml"), "--certs", str(certs.directory)],
                            stdout=subprocess.DEVNULL)
    router = f"127.0.0.1:{ports['router']}"
    try:
        wait_serving(router, 300, [proc], certs.tls("client"))
        yield TLSCluster(certs, router, ports["http"], f"127.0.0.1:{ports['decode']}",
                         f"127.0.0.1:{ports['prefill']}")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)


def test_up_with_certs_serves_a_request_end_to_end(cluster: TLSCluster) -> None:
    client = Client(cluster.router, timeout=60, tls=cluster.certs.tls("client"))
    try:
        deltas = list(client.generate("hello there, a prompt long enough", max_tokens=6,
                                      ignore_eos=True))
    finally:
        client.close()
    assert sum(len(d.token_ids) for d in deltas) == 6
    assert deltas[-1].finish_reason == "length"
    assert deltas[-1].timings["plan"] == "remote" and deltas[-1].timings["kv_bytes"] > 0


def _no_client_cert(certs: CertFiles) -> TLSConfig:
    return TLSConfig(ca=str(certs.ca), require_client_cert=False)


@pytest.mark.parametrize("hop", ["router", "decode", "prefill"])
def test_every_hop_refuses_clients_without_a_ca_signed_certificate(
        cluster: TLSCluster, hop: str, tmp_path: Path) -> None:
    address = getattr(cluster, hop)
    other = write_certs(tmp_path / "other")
    for tls in (None, _no_client_cert(cluster.certs),
                replace(other.tls("client"), ca=str(cluster.certs.ca))):
        client = Client(address, timeout=10, tls=tls)
        try:
            with pytest.raises(grpc.RpcError) as e:
                client.is_serving()
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE  # type: ignore[attr-defined]
        finally:
            client.close()
    client = Client(address, timeout=10, tls=cluster.certs.tls("client"))
    try:
        assert client.is_serving()
    finally:
        client.close()


def test_https_api_requires_a_client_certificate(cluster: TLSCluster) -> None:
    url = f"https://127.0.0.1:{cluster.http_port}/v1/models"
    ok = urllib.request.urlopen(url, timeout=10,
                                context=client_ssl_context(cluster.certs.tls("client")))
    assert ok.status == 200
    bare = client_ssl_context(_no_client_cert(cluster.certs))
    with pytest.raises((ssl.SSLError, urllib.error.URLError, ConnectionResetError)):
        urllib.request.urlopen(url, timeout=10, context=bare).read()
    with pytest.raises((urllib.error.URLError, ConnectionResetError, OSError)):
        urllib.request.urlopen(url.replace("https", "http"), timeout=10).read()


def test_generate_cli_speaks_mtls(cluster: TLSCluster) -> None:
    c = cluster.certs
    t0 = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "pdserve.cli", "generate", "hi there",
                          "--max-tokens", "3", "--address", cluster.router,
                          "--tls-ca", str(c.ca), "--tls-cert", str(c.cert("client")),
                          "--tls-key", str(c.key("client"))],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "tokens" in out.stderr and time.monotonic() - t0 < 120
