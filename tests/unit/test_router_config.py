"""RouterConfig: validated at the boundary, and the router's command line parsed
into it with every default taken from the dataclass."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from pdserve.config import RouterConfig, TLSConfig
from router.server import parse_args


@pytest.fixture(autouse=True)
def _no_env_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PDSERVE_API_KEY", raising=False)


@pytest.mark.parametrize("change,field", [
    ({"port": 70000}, "port"), ({"http_port": -1}, "http_port"), ({"decode": ()}, "decode"),
    ({"decode": ("nocolon",)}, "decode"), ({"prefill": ("p",)}, "prefill"),
    ({"policy": "random"}, "policy"), ({"local_prefill_below": -1}, "local_prefill_below"),
    ({"max_model_len": 1}, "max_model_len"), ({"api_key": ""}, "api_key"),
    ({"max_prompt_chars": 0}, "max_prompt_chars"),
    ({"health_interval_s": 0}, "health_interval_s"), ({"drain_grace_s": -1}, "drain_grace_s"),
    ({"tls": TLSConfig(ca="ca.pem", require_client_cert=False)}, "tls"),
    ({"health_port": 65536}, "health_port"),
])
def test_bad_values_name_the_field(change: dict[str, Any], field: str) -> None:
    with pytest.raises(ValueError, match=f"^{field} must be"):
        RouterConfig(**{"decode": ("d:1",), **change})


def test_members_from_stdin_need_no_static_list() -> None:
    assert RouterConfig(members_stdin=True).decode == ()


def test_defaults_come_from_the_config() -> None:
    assert parse_args(["--decode", "d:1"]) == RouterConfig(decode=("d:1",))
    assert parse_args(["--members-stdin"]) == RouterConfig(members_stdin=True)


def test_every_flag_lands_in_its_field() -> None:
    config = parse_args([
        "--host", "0.0.0.0", "--port", "5", "--http-port", "0", "--model", "/m",
        "--served-model-name", "mm", "--decode", "d:1", "--decode", "d:2", "--prefill", "p:1",
        "--policy", "load_aware", "--local-prefill-below", "3", "--max-model-len", "99",
        "--local-prefill-stall-s", "0.05", "--state-interval", "0.5", "--kv-encodings", "int8,fp16",
        "--max-prompt-chars", "1000", "--api-key", "k", "--health-interval", "0.5",
        "--drain-grace", "2", "--members-stdin",
        "--request-timeout-s", "7", "--no-migration", "--migration-limit", "1",
        "--tls-ca", "ca.pem", "--tls-cert", "r.pem", "--tls-key", "r-key.pem",
        "--tls-require-client-cert", "--health-port", "7"])
    assert config == RouterConfig(
        host="0.0.0.0", port=5, http_port=0, model="/m", served_model_name="mm",
        decode=("d:1", "d:2"), prefill=("p:1",), policy="load_aware", local_prefill_below=3,
        local_prefill_stall_s=0.05, state_interval_s=0.5, kv_encodings=("int8", "fp16"),
        max_model_len=99, max_prompt_chars=1000, api_key="k", health_interval_s=0.5,
        drain_grace_s=2.0,
        members_stdin=True, request_timeout_s=7.0, migration=False, migration_limit=1,
        health_port=7,
        tls=TLSConfig(ca="ca.pem", cert="r.pem", key="r-key.pem", require_client_cert=True))
    # every field was set off its default
    assert [f.name for f in dataclasses.fields(RouterConfig)
            if getattr(config, f.name) == f.default] == []


def test_the_api_key_defaults_to_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PDSERVE_API_KEY", "from-env")
    assert parse_args(["--decode", "d:1"]).api_key == "from-env"
    assert parse_args(["--decode", "d:1", "--api-key", "flag"]).api_key == "flag"


@pytest.mark.parametrize("argv,field", [
    ([], "decode"), (["--decode", "d:1", "--http-port", "70000"], "http_port"),
    (["--decode", "nocolon"], "decode"), (["--decode", "d:1", "--policy", "x"], "--policy"),
    (["--decode", "d:1", "--request-timeout-s", "0"], "request_timeout_s"),
    (["--decode", "d:1", "--migration-limit", "-1"], "migration_limit"),
    (["--decode", "d:1", "--kv-encodings", "int8,model"], "kv_encodings"),
    (["--decode", "d:1", "--tls-cert", "r.pem"], "tls_cert/tls_key"),
])
def test_bad_command_lines_exit_2_naming_the_problem(
        argv: list[str], field: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        parse_args(argv)
    assert e.value.code == 2 and field in capsys.readouterr().err
