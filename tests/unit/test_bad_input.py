"""Bad input is a ValueError naming the field; other requests keep running."""

from __future__ import annotations

from pathlib import Path

import pytest

from pdserve.config import EngineConfig
from pdserve.engine.engine import LLMEngine
from pdserve.sampling_params import SamplingParams
from tests.engine_helpers import assert_engine_empty, run_all


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"max_tokens": 0}, "max_tokens"),
        ({"temperature": -0.5}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -2}, "top_k"),
        ({"min_tokens": -1}, "min_tokens"),
        ({"logprobs": 21}, "logprobs"),
    ],
)
def test_sampling_params_name_the_field(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [({"dtype": "int4"}, "dtype"), ({"device": "tpu"}, "device"),
     ({"block_size": 7}, "block_size"), ({"max_num_batched_tokens": 1}, "max_num_batched_tokens")],
)
def test_engine_config_names_the_field(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(ValueError, match=field):
        EngineConfig(**kwargs)  # type: ignore[arg-type]


def test_unknown_model_path_is_clear(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="model: .*does not exist"):
        LLMEngine(EngineConfig(model=str(tmp_path / "nope")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no config.json"):
        LLMEngine(EngineConfig(model=str(tmp_path / "empty")))


def test_bad_prompts_fail_alone(tiny_llama: Path) -> None:
    engine = LLMEngine(EngineConfig(model=str(tiny_llama), dtype="float32", num_kv_blocks=64,
                                    max_model_len=256))
    ok = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    engine.add_request("good", list(range(5, 25)), ok)
    engine.step()  # the good request is running when the bad ones arrive
    with pytest.raises(ValueError, match="prompt must contain at least 1 token"):
        engine.add_request("empty", [], ok)
    with pytest.raises(ValueError, match="max_model_len=256"):
        engine.add_request("long", [5] * 300, ok)
    with pytest.raises(ValueError, match="token ids must be in"):
        engine.add_request("oov", [10**6], ok)
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request("good", [5], ok)
    done = run_all(engine)
    assert len(done["good"].token_ids) == 6  # type: ignore[attr-defined]
    assert_engine_empty(engine)


def test_abort_mid_decode_frees_blocks(tiny_llama: Path) -> None:
    engine = LLMEngine(EngineConfig(model=str(tiny_llama), dtype="float32", num_kv_blocks=64))
    engine.add_request("a", list(range(5, 45)), SamplingParams(max_tokens=50, ignore_eos=True))
    engine.add_request("b", list(range(5, 45)), SamplingParams(max_tokens=5, ignore_eos=True))
    for _ in range(3):
        engine.step()
    assert engine.abort("a") and not engine.abort("a")
    done = run_all(engine)
    assert done["a"].finish_reason == "abort"  # type: ignore[attr-defined]
    assert len(done["b"].token_ids) == 5  # type: ignore[attr-defined]
    assert_engine_empty(engine)


def test_interrupted_step_counts_nothing_and_is_recomputed(tiny_llama: Path) -> None:
    engine = LLMEngine(EngineConfig(model=str(tiny_llama), dtype="float32", num_kv_blocks=64))
    params = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    engine.add_request("ref", list(range(5, 45)), params)
    reference = run_all(engine)["ref"].token_ids  # type: ignore[attr-defined]
    engine.add_request("a", list(range(5, 45)), params)
    engine.interrupt_requested = True  # an abort is waiting: the step stops between layers
    # Only what the prefix cache supplied counts as computed (2 of its 40 tokens' blocks).
    a = engine.requests["a"]
    assert engine.step() == [] and a.num_computed_tokens == a.num_cached_tokens == 32
    engine.interrupt_requested = False
    assert run_all(engine)["a"].token_ids == reference  # type: ignore[attr-defined]
    assert_engine_empty(engine)
