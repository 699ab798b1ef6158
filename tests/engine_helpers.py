"""Helpers shared by engine tests: the transformers oracle, the leak check, batch runs,
the near-tie comparison and a decode worker's stream."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import torch

from pdserve.engine.async_engine import AsyncEngine
from pdserve.engine.engine import LLMEngine
from pdserve.engine.outputs import RequestOutput
from pdserve.sampling_params import SamplingParams


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


async def wait_streams_closed(*engines: AsyncEngine, within_s: float = 10.0) -> None:
    """A request stream whose reader stopped early (a loopback prefill the decode side
    gave up on) closes when its generator is finalized, a few loop turns later: wait
    for that, then assert every stream closed."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline and any(e.open_requests for e in engines):
        await asyncio.sleep(0.01)
    for e in engines:
        assert not e.open_requests, e.open_requests


def run_all(engine: LLMEngine) -> dict[str, RequestOutput]:
    done: dict[str, RequestOutput] = {}
    while engine.has_unfinished_requests:
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
    return done


def generate_all(engine: LLMEngine, prompts: list[list[int]],
                 params: SamplingParams) -> list[RequestOutput]:
    """Every prompt as one request in one continuous batch, run to the end; the outputs
    in prompt order, with every block free and every queue empty afterwards."""
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, params)
    done = run_all(engine)
    assert_engine_empty(engine)
    return [done[str(i)] for i in range(len(prompts))]


def first_difference(ours: list[int], ref: list[int]) -> int | None:
    return next((i for i, (a, b) in enumerate(zip(ours, ref, strict=True)) if a != b), None)


def assert_follows_until_near_tie(outs: list[RequestOutput], ref: list[RequestOutput],
                                  nats: float = 1.5) -> None:
    """Each of ``outs`` keeps ``ref``'s tokens (run with logprobs) until a near tie: at
    the first difference its token is among ref's top tokens, less than ``nats`` below
    ref's choice (lower precision may flip a tie, never leave ref's answer)."""
    for i, (o, r) in enumerate(zip(outs, ref, strict=True)):
        pos = first_difference(o.token_ids, r.token_ids[:len(o.token_ids)])
        if pos is None:
            continue
        top = dict(r.logprobs[pos].top)
        assert o.token_ids[pos] in top, f"request {i}: left the reference's top at {pos}"
        gap = top[r.token_ids[pos]] - top[o.token_ids[pos]]
        assert gap < nats, f"request {i}: left the reference at a non-tie ({gap:.3f} nats)"


async def read_decode_stream(address: str, request: Any,
                             timeout: float | None = 60) -> tuple[list[int], Any]:
    """A decode worker's Generate over gRPC: (every token, the first message)."""
    import grpc

    from pdserve._proto.pdserve.v1 import worker_pb2_grpc

    async with grpc.aio.insecure_channel(address) as ch:
        tokens: list[int] = []
        first = None
        async for msg in worker_pb2_grpc.DecodeWorkerStub(ch).Generate(request, timeout=timeout):
            first = first or msg
            tokens += msg.token_ids
        assert first is not None
        return tokens, first
