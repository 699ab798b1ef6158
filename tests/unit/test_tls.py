"""mTLS between the workers, over real gRPC on localhost (tiny model, one process):
certificates from ``pdserve certs``, refusals at the handshake, the plaintext health
port, and the decode worker's prefill allowlist."""

from __future__ import annotations

import asyncio
import socket
import stat
from dataclasses import replace
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from grpc_health.v1 import health_pb2, health_pb2_grpc

from decode_worker.prefill_allowlist import PrefillAllowlist
from decode_worker.servicer import DecodeServicer
from pdserve import tls as tls_credentials
from pdserve._proto.pdserve.v1 import worker_pb2, worker_pb2_grpc
from pdserve.certs import ROLES, CertFiles, write_certs
from pdserve.cli import main as cli_main
from pdserve.config import EngineConfig, TLSConfig, WorkerConfig
from pdserve.worker_args import parse_args, worker_argv, worker_config
from pdserve.worker_host import RunningWorker, start_worker
from prefill_worker.servicer import PrefillServicer
from tests.unit.test_workers_grpc import PARAMS, PROMPT, _offline, _settled


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> CertFiles:
    d = tmp_path_factory.mktemp("certs") / "pki"
    assert cli_main(["certs", str(d), "--host", "pdserve-decode", "--host", "10.1.2.3"]) == 0
    return CertFiles(d)


@pytest.fixture(scope="module")
def other_ca(tmp_path_factory: pytest.TempPathFactory) -> CertFiles:
    return write_certs(tmp_path_factory.mktemp("other") / "pki")


def test_certs_are_made_once_with_private_keys_and_sans(certs: CertFiles) -> None:
    for role in ROLES:
        assert stat.S_IMODE(certs.key(role).stat().st_mode) == 0o600
        cert = x509.load_pem_x509_certificate(certs.cert(role).read_bytes())
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert {"localhost", "pdserve-decode"} <= set(sans.get_values_for_type(x509.DNSName))
        assert {"127.0.0.1", "10.1.2.3"} <= {str(ip) for ip in
                                              sans.get_values_for_type(x509.IPAddress)}
    assert stat.S_IMODE((certs.directory / "ca-key.pem").stat().st_mode) == 0o600
    before = certs.ca.read_bytes()
    assert cli_main(["certs", str(certs.directory)]) == 2  # refuses to overwrite
    assert certs.ca.read_bytes() == before


def test_force_replaces_every_file(tmp_path: Path) -> None:
    first = write_certs(tmp_path / "pki").ca.read_bytes()
    assert write_certs(tmp_path / "pki", force=True).ca.read_bytes() != first


def test_tls_config_is_checked_at_the_boundary(certs: CertFiles) -> None:
    with pytest.raises(ValueError, match="^tls_cert/tls_key must be given together"):
        TLSConfig(ca=str(certs.ca), cert=str(certs.cert("decode")))
    with pytest.raises(ValueError, match="^tls must be"):  # workers: mTLS or nothing
        WorkerConfig(role="decode", tls=TLSConfig(ca=str(certs.ca), require_client_cert=False))
    with pytest.raises(ValueError, match="^prefill_allowlist must be"):
        WorkerConfig(role="decode", prefill_allowlist=("nowhere",))
    with pytest.raises(ValueError, match="tls_ca: cannot read"):
        tls_credentials.server_credentials(replace(certs.tls("decode"), ca="/nonexistent.pem"))


def test_worker_tls_flags_round_trip(certs: CertFiles) -> None:
    t = certs.tls("decode")
    config = worker_config("decode", tls_ca=t.ca, tls_cert=t.cert, tls_key=t.key, health_port=7,
                           prefill_allowlist=("127.0.0.1:50061", "10.0.0.1:50062"))
    assert config.tls == t
    assert parse_args("decode", worker_argv(config)) == config


def test_allowlist_rules() -> None:
    assert PrefillAllowlist((), tls=False).permits("anywhere:1")  # plaintext: as before
    assert not PrefillAllowlist((), tls=True).permits("127.0.0.1:1")  # TLS fails closed
    assert PrefillAllowlist(("*",), tls=True).permits("anywhere:1")
    listed = PrefillAllowlist(("LocalHost:5",), tls=True)
    assert listed.permits("localhost:5") and not listed.permits("localhost:6")


def _config(model: Path, role: str, tls: TLSConfig | None, **kw: object) -> WorkerConfig:
    engine = EngineConfig(model=str(model), dtype="float32", num_kv_blocks=64,
                          max_num_batched_tokens=32)
    return WorkerConfig(role=role, engine=engine, port=0, tls=tls, **kw)  # type: ignore[arg-type]


async def _health(address: str, tls: TLSConfig | None) -> int | grpc.StatusCode:
    async with tls_credentials.aio_channel(address, tls) as ch:
        try:
            r = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(),
                                                            timeout=5)
            return int(r.status)
        except grpc.aio.AioRpcError as e:
            return e.code()


async def _generate(address: str, tls: TLSConfig | None, prefill: str, rid: str) -> list[int]:
    async with tls_credentials.aio_channel(address, tls) as ch:
        req = worker_pb2.DecodeRequest(request_id=rid, prompt_token_ids=PROMPT, params=PARAMS,
                                       prefill_address=prefill)
        return [t async for m in worker_pb2_grpc.DecodeWorkerStub(ch).Generate(req, timeout=30)
                for t in m.token_ids]


def _refused_clients(certs: CertFiles, other_ca: CertFiles) -> dict[str, TLSConfig | None]:
    return {"plaintext": None,
            "no client certificate": TLSConfig(ca=str(certs.ca), require_client_cert=False),
            "certificate of another CA": replace(other_ca.tls("router"), ca=str(certs.ca))}


def test_workers_refuse_clients_without_a_ca_signed_certificate(
        tiny_llama: Path, certs: CertFiles, other_ca: CertFiles) -> None:
    """Decode and prefill workers: refused at the handshake unless the client shows a
    certificate of the cluster's CA; the decode worker pulls KV over mTLS."""
    expected = _offline(tiny_llama)
    serving = health_pb2.HealthCheckResponse.SERVING

    async def scenario() -> None:
        p = await start_worker(_config(tiny_llama, "prefill", certs.tls("prefill")),
                               PrefillServicer)
        d = await start_worker(_config(tiny_llama, "decode", certs.tls("decode"),
                                       prefill_allowlist=(p.address,)), DecodeServicer)
        try:
            for w in (p, d):
                for who, client in _refused_clients(certs, other_ca).items():
                    code = await _health(w.address, client)
                    assert code == grpc.StatusCode.UNAVAILABLE, (w.address, who)
                assert await _health(w.address, certs.tls("router")) == serving
            assert await _generate(d.address, certs.tls("router"), p.address, "a") == expected
            assert p.metrics.kv_bytes._value.get() > 0  # the KV came over the mTLS hop
            await _settled(p, d)
        finally:
            await d.stop(0)
            await p.stop(0)

    asyncio.run(scenario())


def test_a_decode_worker_without_a_client_certificate_gets_no_kv(
        tiny_llama: Path, certs: CertFiles) -> None:
    """The prefill worker refuses a decode worker whose certificate is not the CA's
    (here: plaintext dialing); with ``prefill_fallback: fail`` the request fails."""

    async def scenario() -> None:
        p = await start_worker(_config(tiny_llama, "prefill", certs.tls("prefill")),
                               PrefillServicer)
        d = await start_worker(_config(tiny_llama, "decode", None, prefill_fallback="fail"),
                               DecodeServicer)
        try:
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await _generate(d.address, None, p.address, "x")
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE
            assert p.metrics.kv_bytes._value.get() == 0
            await _settled(p, d)
        finally:
            await d.stop(0)
            await p.stop(0)

    asyncio.run(scenario())


def _listener() -> socket.socket:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(8)
    s.setblocking(False)
    return s


@pytest.mark.parametrize("tls", [False, True], ids=["plaintext", "mtls"])
def test_allowlist_refuses_a_foreign_prefill_address_without_dialing(
        tiny_llama: Path, certs: CertFiles, tls: bool) -> None:
    foreign = _listener()
    address = f"127.0.0.1:{foreign.getsockname()[1]}"
    worker_tls = certs.tls("decode") if tls else None

    async def scenario() -> None:
        d = await start_worker(_config(tiny_llama, "decode", worker_tls,
                                       prefill_allowlist=("127.0.0.1:1",)), DecodeServicer)
        try:
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await _generate(d.address, certs.tls("router") if tls else None, address, "f")
            assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert address in (e.value.details() or "")
            with pytest.raises(BlockingIOError):
                foreign.accept()  # nobody dialled it
            await _settled(d)
        finally:
            await d.stop(0)
            foreign.close()

    asyncio.run(scenario())


def test_health_port_is_plaintext_and_serves_health_only(
        tiny_llama: Path, certs: CertFiles) -> None:
    """kubelet's gRPC probes speak no TLS: the health port answers them, and nothing
    else is reachable there."""

    async def scenario() -> None:
        w: RunningWorker = await start_worker(
            _config(tiny_llama, "decode", certs.tls("decode"), health_port=_free_port()),
            DecodeServicer)
        probe = f"127.0.0.1:{w.server.health_port}"
        try:
            assert await _health(probe, None) == health_pb2.HealthCheckResponse.SERVING
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await _generate(probe, None, "", "h")
            assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED
            await w.server.set_serving(False)
            assert await _health(probe, None) == health_pb2.HealthCheckResponse.NOT_SERVING
        finally:
            await w.stop(0)

    asyncio.run(scenario())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
