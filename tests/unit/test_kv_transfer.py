"""Prefill in engine A, move the KV layer by layer to engine B, decode there."""

from __future__ import annotations

from pathlib import Path

import torch

from pdserve.config import EngineConfig
from pdserve.engine.engine import LLMEngine
from pdserve.sampling_params import SamplingParams
from tests.engine_helpers import assert_engine_empty, run_all


class ListExporter:
    """Collects (layer, start, k, v) copies in the order the forward pass produced them."""

    def __init__(self) -> None:
        self.chunks: list[tuple[int, int, torch.Tensor, torch.Tensor]] = []

    def on_kv(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        self.chunks.append((layer, start, k.clone(), v.clone()))


def _engine(model: Path) -> LLMEngine:
    return LLMEngine(EngineConfig(model=str(model), dtype="float32", num_kv_blocks=64,
                                  max_num_batched_tokens=32))


def test_prefill_on_a_decode_on_b_gives_a_alone_tokens(tiny_llama: Path) -> None:
    prompt = list(range(5, 75))  # 70 tokens: 3 chunks of at most 32
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    a, b = _engine(tiny_llama), _engine(tiny_llama)

    # STEP 1: engine A alone, the reference.
    a.add_request("ref", prompt, params)
    reference = run_all(a)["ref"].token_ids  # type: ignore[attr-defined]

    # STEP 2: A prefills only (max_tokens=1) and exports the KV as it computes it.
    exporter = ListExporter()
    a.add_request("p", prompt, SamplingParams(temperature=0, max_tokens=1, ignore_eos=True),
                  kv_exporter=exporter)
    first = run_all(a)["p"].token_ids  # type: ignore[attr-defined]
    layers = a.spec.num_layers
    # The reference left the prompt's first 4 blocks in A's prefix cache: they go out
    # first, read from the pool, then the rest as it is computed; each layer in order.
    assert a.scheduler.prefix_hits == 64
    for layer in range(layers):
        rows = [(s, k.shape[0]) for n, s, k, _ in exporter.chunks if n == layer]
        assert rows == [(0, 64), (64, 6)]
    assert [c[0] for c in exporter.chunks[:layers]] == list(range(layers))  # layer order
    assert_engine_empty(a)

    # STEP 3: B reserves blocks, takes the chunks, commits the first token, decodes.
    b.begin_import("d", prompt, params)
    used = b.blocks.num_blocks - b.blocks.num_free_blocks
    assert used == b.blocks.blocks_for_tokens(len(prompt) + 1)
    for layer, start, k, v in exporter.chunks:
        b.write_kv("d", layer, start, k, v)
    b.commit_import("d", first[0])
    assert run_all(b)["d"].token_ids == reference  # type: ignore[attr-defined]
    assert_engine_empty(b)


def test_aborted_import_frees_its_blocks(tiny_llama: Path) -> None:
    b = _engine(tiny_llama)
    b.begin_import("d", list(range(5, 60)), SamplingParams(max_tokens=4))
    assert not b.blocks.all_free()
    assert b.abort("d")
    run_all(b)
    assert_engine_empty(b)
