"""Cluster config → role configs → command lines, and back: every default written
once (pdserve/config.py), every command line parsed back into the config it came
from, launchers found by name."""

from __future__ import annotations

import dataclasses
from importlib.metadata import EntryPoint
from pathlib import Path

import pytest

from pdserve import launchers
from pdserve.cluster_config import ClusterConfig, Member, default_member
from pdserve.config import ROLE_DEFAULTS, EngineConfig, RouterConfig, WorkerConfig
from pdserve.launch import role_env, router_command
from pdserve.logs import FORMAT_ENV, split_format_flag
from pdserve.worker_args import parse_args, parse_invocation, worker_argv, worker_command


def _cluster(**kw: object) -> ClusterConfig:
    return ClusterConfig(launcher="process", **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize("role", ["prefill", "decode"])
def test_worker_defaults_are_the_role_defaults(role: str) -> None:
    w = parse_args(role, [])
    d = ROLE_DEFAULTS[role]
    assert (w.port, w.metrics_port, w.engine.max_num_batched_tokens) == (d.port, 0, d.max_num_batched_tokens)
    assert (w.host, w.kv_encoding, w.prefill_fallback) == (WorkerConfig.host, "model", "local")
    assert (w.engine.dtype, w.engine.device, w.placement.mode) == ("bfloat16", "auto", "auto")
    assert default_member(role) == Member(d.port, d.metrics_port)


@pytest.mark.parametrize("role", ["prefill", "decode"])
def test_cluster_worker_config_round_trips_through_argv(role: str) -> None:
    c = _cluster(model="/models/m", dtype="float32", quantization="int8", kv_encoding="int8",
                 host="0.0.0.0", enable_prefix_caching=False,
                 speculative_config={"num_speculative_tokens": 3, "prompt_lookup_max": 4},
                 prefill_fallback="fail", kv_idle_timeout_s=2.5, pin="off",
                 prefill=[Member(6001, 9001, (0, 2), 2)], decode=[Member(6002, 0, None, None)])
    m = (c.prefill if role == "prefill" else c.decode)[0]
    config = c.worker(role, m, 1, 2)
    assert parse_args(role, worker_argv(config)) == config
    assert worker_command(config)[1:3] == ["-m", f"{role}_worker"]
    assert (config.port, config.placement.cpus, config.engine.num_threads) == (m.port, m.cpus, m.threads)
    assert (config.placement.slot, config.placement.slots) == (1, 2)
    assert config.engine.enable_prefix_caching is False
    assert "--no-enable-prefix-caching" in worker_argv(config)
    spec = config.engine.speculative_config  # decode workers only: prefill samples one token
    assert (spec is None) if role == "prefill" else (
        (spec.num_speculative_tokens, spec.prompt_lookup_min, spec.prompt_lookup_max) == (3, 4, 4))


def test_default_cluster_workers_are_the_default_workers_with_metrics() -> None:
    """... and decode workers may dial the cluster's prefill pool only."""
    c = _cluster()
    for role, m in c.members():
        pool = ["--prefill-allowlist", "127.0.0.1:50061"] if role == "decode" else []
        assert c.worker(role, m, 0, 1) == parse_args(
            role, ["--metrics-port", str(m.metrics_port), *pool])


def test_worker_argv_refuses_what_the_command_line_cannot_say() -> None:
    config = WorkerConfig(role="decode", engine=EngineConfig(num_kv_blocks=64))
    with pytest.raises(ValueError, match="cannot express"):
        worker_argv(config)


def test_worker_log_format_flag() -> None:
    config, fmt = parse_invocation("decode", ["--log-format", "json", "--port", "7"])
    assert (config.port, fmt) == (7, "json")
    assert parse_invocation("decode", [])[1] is None
    assert split_format_flag(["--decode", "h:1", "--log-format", "text"]) == ("text", ["--decode", "h:1"])
    assert split_format_flag(["--decode", "h:1"]) == (None, ["--decode", "h:1"])


def test_cluster_router_defaults_are_the_router_config_defaults() -> None:
    c, r = _cluster(), RouterConfig(decode=("h:1",))
    assert (c.host, c.router_port, c.http_port, c.local_prefill_below) == (
        r.host, r.port, r.http_port, r.local_prefill_below)
    assert c.router(["h:1"], []) == r


def test_router_command_says_what_its_config_says(monkeypatch: pytest.MonkeyPatch) -> None:
    from router.server import parse_args as router_args

    r = _cluster(model="/m", api_key="k", local_prefill_below=3, http_port=0,
                 router_port=7000, migration=False,
                 kv_encodings=("int8",)).router(["h:1", "h:2"], ["h:3"])
    monkeypatch.setenv("PDSERVE_API_KEY", "k")  # the launcher passes it by environment
    parsed = router_args(router_command(r)[3:])
    carried = ("host", "port", "http_port", "model", "decode", "prefill", "local_prefill_below",
               "members_stdin", "api_key", "migration", "kv_encodings")
    got = {f: getattr(parsed, f) for f in carried}
    assert {k: tuple(v) if isinstance(v, list) else v for k, v in got.items()} == {
        f: getattr(r, f) for f in carried}
    assert "k" not in router_command(r)


def test_role_env_carries_the_key_and_the_log_format(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(FORMAT_ENV, raising=False)
    assert role_env() == {}
    monkeypatch.setenv(FORMAT_ENV, "json")
    assert role_env("k") == {FORMAT_ENV: "json", "PDSERVE_API_KEY": "k"}


def test_cluster_config_validates_with_the_roles_rules() -> None:
    for bad, field in [({"dtype": "int4"}, "dtype"), ({"kv_encoding": "x"}, "kv_encoding"),
                       ({"pin": "x"}, "pin"), ({"kv_encodings": ("model",)}, "kv_encodings"),
                       ({"speculative_config": {"num_speculative_tokens": 99}},
                        "num_speculative_tokens"),
                       ({"prefill_fallback": "x"}, "prefill_fallback"),
                       ({"http_port": 70000}, "http_port"), ({"launcher": "x"}, "launcher"),
                       ({"decode": []}, "decode"), ({"prefill": [Member(70000)]}, "port")]:
        with pytest.raises(ValueError, match=field):
            ClusterConfig(**bad)  # type: ignore[arg-type]


def _up(config: ClusterConfig) -> int:
    return 7


def test_launchers_are_found_by_name_in_the_entry_points() -> None:
    eps = [EntryPoint("fake", f"{__name__}:_up", launchers.GROUP)]
    assert launchers.names(eps) == ("fake",)
    assert launchers.find("fake", eps)(_cluster()) == 7
    with pytest.raises(ValueError, match=r"launcher must be one of \('fake',\), got 'ray'"):
        launchers.find("ray", eps)


def test_this_checkout_registers_the_process_and_ray_launchers() -> None:
    from pdserve.process_launcher import up

    assert {"process", "ray"} <= set(launchers.names())
    assert launchers.find("process") is up
    entry = {ep.name: ep.value for ep in launchers.registered()}
    assert entry["ray"] == "deploy.ray.launcher:up"  # not loaded: that imports ray


def test_scaling_keeps_the_defaults() -> None:
    from pdserve.cluster_config import scaled

    assert scaled([], 2, default_member("decode")) == [Member(50071, 9071), Member(50072, 9072)]
    assert dataclasses.replace(_cluster(), decode=scaled([], 1, default_member("decode"))) == _cluster()


def test_cluster_yaml_migration_kv_idle_timeout_and_encodings_reach_their_roles(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("migration: false\nkv_idle_timeout_s: 2.0\nkv_encodings: [int8]\n")
    c = ClusterConfig.from_yaml(f)
    assert c.router(["h:1"], []).migration is False
    assert c.router(["h:1"], []).kv_encodings == ("int8",)
    assert "--no-migration" in router_command(c.router(["h:1"], []))
    assert c.worker("decode", c.decode[0], 0, 1).kv_idle_timeout_s == 2.0
    f.write_text("kv_idle_timeout_s: 0\n")
    with pytest.raises(ValueError, match="kv_idle_timeout_s"):
        ClusterConfig.from_yaml(f)


def test_certs_turn_on_mtls_for_every_role_and_round_trip(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    from pdserve.certs import write_certs
    from router.server import parse_args as router_args

    monkeypatch.chdir(tmp_path)
    write_certs(tmp_path / "pki")
    (tmp_path / "c.yaml").write_text("launcher: process\ncerts: pki\n"
                                     "prefill: [{port: 6001}, {port: 6002}]\n")
    c = ClusterConfig.from_yaml(tmp_path / "c.yaml")
    for role, m in c.members():
        w = c.worker(role, m, 0, 2)
        assert w.tls is not None and w.tls.cert == str(tmp_path / "pki" / f"{role}.pem")
        assert w.tls.require_client_cert
        assert parse_args(role, worker_argv(w)) == w
    decode = c.worker("decode", c.decode[0], 1, 2)
    assert decode.prefill_allowlist == ("127.0.0.1:6001", "127.0.0.1:6002")
    r = c.router(["127.0.0.1:50071"], c.prefill_addresses())
    assert r.tls is not None and not r.tls.require_client_cert  # optional on the public API
    assert router_args(router_command(r)[3:]) == r
    strict = dataclasses.replace(c, tls_require_client_cert=True).router(["d:1"], [])
    assert strict.tls is not None and strict.tls.require_client_cert
    assert router_args(router_command(strict)[3:]) == strict


def test_certs_directory_must_hold_every_role(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="ca.pem is missing; make the directory with"):
        _cluster(certs=str(tmp_path))


def test_gpu_prefill_cpu_decode_split_reaches_each_worker(tmp_path: Path) -> None:
    """``prefill_device: cuda`` + ``decode_device: cpu``: each role gets its device, and
    every worker on the machine knows the prefill slots hold the GPU (placement.py)."""
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("launcher: process\nprefill_device: cuda\ndecode_device: cpu\n")
    c = ClusterConfig.from_yaml(yaml_file)
    members = c.members()
    workers = [c.worker(r, m, i, len(members)) for i, (r, m) in enumerate(members)]
    assert [(w.role, w.engine.device, w.placement.gpu) for w in workers] == [
        ("prefill", "cuda", True), ("decode", "cpu", False)]
    assert {w.placement.gpu_workers for w in workers} == {1}
    for w in workers:
        assert parse_args(w.role, worker_argv(w)) == w
    # Workers spread over other hosts (Ray): no split is assumed.
    assert c.worker("decode", c.decode[0], 0, 1).placement.gpu_workers == 0
    both_gpu = _cluster(prefill_device="cuda", decode_device="cuda")
    assert both_gpu.worker("decode", both_gpu.decode[0], 1, 2).placement.gpu_workers == 0
