"""The real default model: a chat answer, and KV moved between two engines."""

from __future__ import annotations

from pathlib import Path

import pytest

from pdserve import LLM, SamplingParams
from pdserve.config import EngineConfig
from pdserve.engine.engine import LLMEngine
from tests.engine_helpers import assert_engine_empty, run_all
from tests.unit.test_kv_transfer import ListExporter


@pytest.mark.integration
def test_chat_answers_paris(default_model_dir: Path) -> None:
    # fp32: its first token is a near tie ("The" 0.08 nats ahead of "L"), which bf16
    # arithmetic breaks either way depending on the CPU (AMX boxes answer in French).
    llm = LLM(model=str(default_model_dir), dtype="float32")
    out = llm.chat([{"role": "user", "content": "What is the capital of France?"}],
                   SamplingParams(temperature=0, max_tokens=30))[0]
    assert "Paris" in out.text and out.finish_reason in ("stop", "length")
    assert_engine_empty(llm.engine)


@pytest.mark.integration
def test_kv_moved_between_engines_gives_same_tokens(default_model_dir: Path) -> None:
    cfg = EngineConfig(model=str(default_model_dir), dtype="bfloat16", kv_cache_gb=0.1,
                       max_num_batched_tokens=256)
    a, b = LLMEngine(cfg), LLMEngine(cfg)
    prompt = a.tokenize("Disaggregated serving splits prefill and decode. " * 40)
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    a.add_request("ref", prompt, params)
    reference = run_all(a)["ref"].token_ids  # type: ignore[attr-defined]

    exporter = ListExporter()
    a.add_request("p", prompt, SamplingParams(temperature=0, max_tokens=1), kv_exporter=exporter)
    first = run_all(a)["p"].token_ids  # type: ignore[attr-defined]
    b.begin_import("d", prompt, params)
    for layer, start, k, v in exporter.chunks:
        b.write_kv("d", layer, start, k, v)
    b.commit_import("d", first[0])
    assert run_all(b)["d"].token_ids == reference  # type: ignore[attr-defined]
    assert_engine_empty(a)
    assert_engine_empty(b)
