"""Helpers shared by engine tests: the transformers oracle and the leak check."""

from __future__ import annotations

from pathlib import Path

import torch

from pdserve.engine.engine import LLMEngine
from pdserve.engine.outputs import RequestOutput


def hf_greedy(model_dir: Path, prompts: list[list[int]], n: int,
              dtype: torch.dtype = torch.float32) -> list[list[int]]:
    """transformers' own greedy continuation (EOS suppressed for n tokens), one by one."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    outs = []
    for ids in prompts:
        x = torch.tensor([ids])
        y = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n,
                        min_new_tokens=n, do_sample=False, pad_token_id=0)
        outs.append(y[0, len(ids):].tolist())
    return outs


def assert_engine_empty(engine: LLMEngine) -> None:
    """Every KV block free, every queue empty, no request left behind."""
    assert engine.blocks.all_free(), f"{engine.blocks.num_free_blocks}/{engine.blocks.num_blocks}"
    assert not engine.scheduler.waiting and not engine.scheduler.running
    assert not engine.requests


def run_all(engine: LLMEngine) -> dict[str, RequestOutput]:
    done: dict[str, RequestOutput] = {}
    while engine.has_unfinished_requests:
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
    return done
