"""Scheduler decisions without a model: token budget, decode first, preemption."""

from __future__ import annotations

from pdserve.engine.block_manager import BlockManager
from pdserve.engine.request import Request, RequestState
from pdserve.engine.scheduler import Scheduler, SchedulerOutput
from pdserve.sampling_params import SamplingParams


def _req(rid: str, n: int) -> Request:
    return Request(rid, list(range(n)), SamplingParams(max_tokens=100))


def _apply(out: SchedulerOutput) -> None:
    """What the engine does after the forward pass: count tokens, sample when caught up."""
    for c in out.chunks:
        samples = c.samples
        c.request.num_computed_tokens += c.num_tokens
        if samples:
            c.request.append_token(7, None)


def test_chunked_prefill_under_budget_and_decode_first() -> None:
    bm = BlockManager(64, 16)
    s = Scheduler(bm, max_num_batched_tokens=32, max_num_seqs=8)
    a, b = _req("a", 20), _req("b", 50)
    s.add(a)
    s.add(b)
    # STEP 1: a's whole prompt (20) + 12 tokens of b's.
    out = s.schedule()
    assert [(c.request.request_id, c.num_tokens) for c in out.chunks] == [("a", 20), ("b", 12)]
    _apply(out)
    # STEP 2: a decodes one token first, then b gets the remaining budget.
    out = s.schedule()
    assert [(c.request.request_id, c.num_tokens) for c in out.chunks] == [("a", 1), ("b", 31)]
    assert out.num_tokens == 32
    _apply(out)
    # STEP 3: b's last 7 prompt tokens, and a's decode.
    out = s.schedule()
    assert {(c.request.request_id, c.num_tokens) for c in out.chunks} == {("a", 1), ("b", 7)}
    for r in (a, b):
        s.remove(r)
        bm.free(r.finish("abort"))
    assert bm.all_free() and not s.has_work


def test_newest_request_is_preempted_when_pool_runs_dry() -> None:
    bm = BlockManager(4, 16)  # 64 tokens in all
    s = Scheduler(bm, max_num_batched_tokens=256, max_num_seqs=8)
    a, b = _req("a", 32), _req("b", 32)
    s.add(a)
    s.add(b)
    _apply(s.schedule())  # both prompts fill the pool exactly
    assert bm.num_free_blocks == 0
    out = s.schedule()  # a needs a 3rd block for its next token: b goes back
    assert out.preempted == [b] and b.state is RequestState.WAITING
    assert b.num_computed_tokens == 0 and not b.block_ids
    assert [c.request for c in out.chunks] == [a]
    assert list(s.waiting) == [b]
    for r in (a, b):
        s.remove(r)
        bm.free(r.finish("abort"))
    assert bm.all_free() and not s.has_work
