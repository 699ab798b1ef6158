"""Helpers shared by engine tests: the transformers oracle and the leak check."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import torch

from pdserve.engine.engine import LLMEngine
from pdserve.engine.outputs import RequestOutput


def hf_greedy(model_dir: Path, prompts: list[list[int]], n: int,
              dtype: torch.dtype = torch.float32, device: str = "cpu") -> list[list[int]]:
    """transformers' own greedy continuation (EOS suppressed for n tokens), one by one."""
    from transformers import AutoModelForCausalLM

    hf: Any = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    hf = hf.to(device)
    outs = []
    for ids in prompts:
        x = torch.tensor([ids], device=device)
        y = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n,
                        min_new_tokens=n, do_sample=False, pad_token_id=0)
        outs.append(y[0, len(ids):].tolist())
    return outs


def assert_engine_empty(engine: LLMEngine) -> None:
    """Every KV block free, every queue empty, no request left behind."""
    assert engine.blocks.all_free(), f"{engine.blocks.num_free_blocks}/{engine.blocks.num_blocks}"
    assert not engine.scheduler.waiting and not engine.scheduler.running
    assert not engine.requests


async def wait_engines_empty(*engines: LLMEngine, within_s: float = 10.0) -> None:
    """Aborts reach an engine thread asynchronously: wait (a loaded box can take
    seconds) until every engine is idle, then assert it is empty."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline and not all(
            e.blocks.all_free() and not e.requests for e in engines):
        await asyncio.sleep(0.01)
    for e in engines:
        assert_engine_empty(e)


def run_all(engine: LLMEngine) -> dict[str, RequestOutput]:
    done: dict[str, RequestOutput] = {}
    while engine.has_unfinished_requests:
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
    return done
