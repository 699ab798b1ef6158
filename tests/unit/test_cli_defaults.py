"""Defaults that let a newcomer's first command work: `pdserve --version`, the packaged
Ray cluster config for `pdserve up --address` and `python -m deploy.ray.job`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

import pdserve
from pdserve import launchers
from pdserve.cli import main
from pdserve.cluster_config import ClusterConfig

PACKAGED = Path(__file__).resolve().parents[2] / "deploy" / "ray" / "cluster.yaml"


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"pdserve {pdserve.__version__}"


def _captured_up(monkeypatch: pytest.MonkeyPatch) -> list[ClusterConfig]:
    got: list[ClusterConfig] = []

    def fake_up(config: ClusterConfig) -> int:
        got.append(config)
        return 0

    def fake_find(name: str) -> Any:
        return fake_up

    monkeypatch.setattr(launchers, "find", fake_find)
    return got


def test_up_with_address_and_no_config_runs_the_packaged_ray_config(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    got = _captured_up(monkeypatch)
    assert main(["up", "--address", "auto"]) == 0
    packaged = ClusterConfig.from_yaml(str(PACKAGED))
    assert got[0].ray.address == "auto" and got[0].launcher == "ray"
    assert got[0].host == packaged.host == "0.0.0.0"
    assert got[0].ray.max_restarts == packaged.ray.max_restarts
    assert f"using the packaged {PACKAGED}" in capsys.readouterr().err


def test_up_without_address_keeps_the_local_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    got = _captured_up(monkeypatch)
    assert main(["up", "--prefill", "2"]) == 0
    assert got[0].host == ClusterConfig().host and got[0].ray.address is None
    assert len(got[0].prefill) == 2


def test_up_no_migration_reaches_the_router(monkeypatch: pytest.MonkeyPatch) -> None:
    got = _captured_up(monkeypatch)
    assert main(["up"]) == 0 and main(["up", "--no-migration"]) == 0
    assert got[0].migration is True and got[1].migration is False
    assert got[1].router(["h:1"], []).migration is False


def test_up_no_enable_prefix_caching_reaches_every_worker(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    got = _captured_up(monkeypatch)
    assert main(["up"]) == 0 and main(["up", "--no-enable-prefix-caching"]) == 0
    assert got[0].enable_prefix_caching is True and got[1].enable_prefix_caching is False
    for role, m in got[1].members():
        assert not got[1].worker(role, m, 0, 2).engine.enable_prefix_caching
    f = tmp_path / "c.yaml"
    f.write_text("enable_prefix_caching: false\n")
    assert ClusterConfig.from_yaml(f).enable_prefix_caching is False


def test_up_speculative_config_and_kv_encodings_reach_their_roles(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    got = _captured_up(monkeypatch)
    assert main(["up", "--speculative-config", '{"num_speculative_tokens": 2}',
                 "--kv-encodings", "int8"]) == 0
    c = got[0]
    spec = c.worker("decode", c.decode[0], 1, 2).engine.speculative_config
    assert spec is not None and spec.num_speculative_tokens == 2
    assert c.worker("prefill", c.prefill[0], 0, 2).engine.speculative_config is None
    assert c.router(["h:1"], []).kv_encodings == ("int8",)
    with pytest.raises(SystemExit) as e:
        main(["up", "--speculative-config", '{"method": "medusa", "num_speculative_tokens": 2}'])
    assert e.value.code == 2 and "method" in capsys.readouterr().err


def test_packaged_config_is_found_by_launcher_name() -> None:
    assert launchers.packaged_config("ray") == str(PACKAGED)
    assert launchers.packaged_config("process") is None
    with pytest.raises(ValueError, match="launcher must be one of"):
        launchers.packaged_config("nope")


def test_ray_job_without_arguments_runs_the_packaged_config(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from deploy.ray import job

    got: list[ClusterConfig] = []

    def fake_up(config: ClusterConfig) -> int:
        got.append(config)
        return 0

    monkeypatch.setattr(job, "up", fake_up)
    assert job.main([]) == 0
    assert got[0].launcher == "ray" and got[0].ray.address == "auto"
    assert got[0].router_port == ClusterConfig.from_yaml(str(PACKAGED)).router_port
