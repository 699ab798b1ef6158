"""Front-door pieces without a cluster: OpenAI body parsing, the API key, GPU gauges
with NVML absent or faked, and the router's promise never to import torch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from pdserve.cluster_config import ClusterConfig
from pdserve.gpu_metrics import register_gpu_metrics
from pdserve.metrics import WorkerMetrics
from router.auth import ApiKey
from router.openai_protocol import BadRequest, parse_chat, parse_completion

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


@pytest.mark.parametrize("extra,param", [
    ({"temperature": "hot"}, "temperature"), ({"temperature": 2.5}, "temperature"),
    ({"top_p": 0}, "top_p"), ({"top_k": -2}, "top_k"), ({"max_tokens": 1.5}, "max_tokens"),
    ({"max_completion_tokens": 0}, "max_completion_tokens"), ({"n": 17}, "n"),
    ({"n": True}, "n"), ({"stop": 3}, "stop"), ({"seed": "x"}, "seed"),
    ({"logprobs": 1}, "logprobs"), ({"top_logprobs": 21, "logprobs": True}, "top_logprobs"),
    ({"stream_options": {"include_usage": True}}, "stream_options"),
    ({"stream": True, "stream_options": {"include_usage": 1}}, "stream_options.include_usage"),
    ({"messages": "hi"}, "messages"), ({"messages": [{"content": "hi"}]}, "messages"),
    ({"model": 3}, "model"), ({"presence_penalty": 0.5}, "presence_penalty"),
    ({"ignore_eos": "yes"}, "ignore_eos"), ({"min_tokens": -1}, "min_tokens"),
])
def test_bad_chat_bodies_name_the_field(extra: dict[str, Any], param: str) -> None:
    with pytest.raises(BadRequest) as e:
        parse_chat({**CHAT, **extra})
    assert e.value.param == param and e.value.status == 400
    assert e.value.envelope()["error"]["type"] == "invalid_request_error"


def test_chat_body_becomes_domain_requests() -> None:
    p = parse_chat({**CHAT, "max_completion_tokens": 7, "temperature": 0.5, "stop": "END",
                    "seed": 3, "n": 2, "logprobs": True, "top_logprobs": 4, "stream": True,
                    "stream_options": {"include_usage": True},
                    "messages": [{"role": "user", "content": [{"type": "text", "text": "a"},
                                                              {"type": "text", "text": "b"}]}]})
    a, b = p.requests("chatcmpl-x")
    assert (a.request_id, b.request_id) == ("chatcmpl-x-0", "chatcmpl-x-1")
    assert a.messages == [{"role": "user", "content": "ab"}] and a.check_context
    assert (a.params.max_tokens, a.params.stop, a.params.logprobs) == (7, ("END",), 4)
    assert (a.params.seed, b.params.seed) == (3, 4)  # choices differ, runs repeat
    assert p.stream and p.include_usage and not a.fill_context
    assert parse_chat(CHAT).prompts[0].fill_context  # no max_tokens: fill the context


def test_completion_prompts() -> None:
    assert parse_completion({"prompt": "hi"}).prompts[0].params.max_tokens == 16
    assert parse_completion({"prompt": [1, 2, 3]}).prompts[0].token_ids == [1, 2, 3]
    batch = parse_completion({"prompt": ["a", [4, 5]], "n": 2, "logprobs": 0})
    assert [r.request_id for r in batch.requests("c")] == ["c-0", "c-1", "c-2", "c-3"]
    assert batch.logprobs == 0
    for bad in ([], [1, -2], None, [[]], {"a": 1}, [True]):
        with pytest.raises(BadRequest) as e:
            parse_completion({"prompt": bad})
        assert e.value.param == "prompt"
    with pytest.raises(BadRequest) as e:
        parse_completion([1, 2])
    assert e.value.status == 400 and e.value.param is None


def test_api_key_accepts_only_the_exact_bearer_header() -> None:
    key = ApiKey("s3cret")
    assert key.accepts("Bearer s3cret")
    for wrong in (None, "", "s3cret", "Bearer s3cre", "Bearer s3cret ", "bearer s3cret"):
        assert not key.accepts(wrong)
    with pytest.raises(ValueError):
        ApiKey("")


def test_no_gpu_gauges_when_nvml_is_absent(monkeypatch: pytest.MonkeyPatch) -> None:
    import pynvml

    def no_library() -> None:
        raise pynvml.NVMLError(pynvml.NVML_ERROR_LIBRARY_NOT_FOUND)

    monkeypatch.setattr(pynvml, "nvmlInit", no_library)
    metrics = WorkerMetrics("m", "decode")
    text = generate_latest(metrics.registry).decode()
    assert not metrics.gpu and "DCGM_" not in text
    assert "pdserve:num_preemptions_total" in text and "pdserve:prefix_cache_hits_total" in text


class _FakeNvml:
    NVMLError = RuntimeError

    def nvmlInit(self) -> None:  # noqa: N802 - NVML's names
        pass

    def nvmlDeviceGetCount(self) -> int:  # noqa: N802
        return 1

    def nvmlDeviceGetHandleByIndex(self, i: int) -> int:  # noqa: N802
        return i

    def nvmlDeviceGetUUID(self, h: int) -> bytes:  # noqa: N802
        return b"GPU-1234"

    def nvmlDeviceGetName(self, h: int) -> str:  # noqa: N802
        return "NVIDIA H100"

    def nvmlDeviceGetUtilizationRates(self, h: int) -> SimpleNamespace:  # noqa: N802
        return SimpleNamespace(gpu=42)

    def nvmlDeviceGetMemoryInfo(self, h: int) -> SimpleNamespace:  # noqa: N802
        return SimpleNamespace(used=3 * 1024 * 1024, free=5 * 1024 * 1024)

    def nvmlDeviceGetPowerUsage(self, h: int) -> int:  # noqa: N802
        return 150_000  # mW


def test_gpu_gauges_use_dcgm_names_and_units() -> None:
    registry = CollectorRegistry()
    assert register_gpu_metrics(registry, _FakeNvml())
    get = registry.get_sample_value
    labels = {"gpu": "0", "UUID": "GPU-1234", "device": "nvidia0", "modelName": "NVIDIA H100"}
    assert get("DCGM_FI_DEV_GPU_UTIL", labels) == 42
    assert (get("DCGM_FI_DEV_FB_USED", labels), get("DCGM_FI_DEV_FB_FREE", labels)) == (3, 5)
    assert get("DCGM_FI_DEV_POWER_USAGE", labels) == 150.0


def test_router_never_imports_torch() -> None:
    code = ("import sys, router.server, router.openai_http, pdserve.client; "
            "sys.exit('torch' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0


def test_cluster_yaml_router_section(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("http_port: 8100\napi_key: k1\n")
    c = ClusterConfig.from_yaml(f)
    assert (c.http_port, c.api_key) == (8100, "k1")
    for bad in ("http_port: 70000\n", "api_key: ''\n"):
        f.write_text(bad)
        with pytest.raises(ValueError, match=bad.split(":")[0]):
            ClusterConfig.from_yaml(f)
