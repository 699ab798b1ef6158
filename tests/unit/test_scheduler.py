"""Scheduler decisions without a model: token budget, decode first, preemption, and the
update after each step (token counting, stop conditions, blocks freed at finish)."""

from __future__ import annotations

from pdserve.engine.block_manager import BlockManager
from pdserve.engine.request import Request, RequestState
from pdserve.engine.scheduler import SampledToken, Scheduler, SchedulerOutput
from pdserve.engine.stop_checker import StopChecker
from pdserve.sampling_params import SamplingParams

EOS = 2


def _req(rid: str, n: int, **params: object) -> Request:
    return Request(rid, list(range(n)), SamplingParams(**{"max_tokens": 100, **params}))


def _scheduler(bm: BlockManager, max_num_batched_tokens: int = 256, max_model_len: int = 4096,
               tokenizer: object = None) -> Scheduler:
    stops = StopChecker((EOS,), max_model_len, tokenizer)
    return Scheduler(bm, max_num_batched_tokens, max_num_seqs=8, stops=stops)


def _apply(s: Scheduler, out: SchedulerOutput, token: int = 7) -> list[Request]:
    """The real update, with ``token`` as what every sampling chunk sampled."""
    return s.update(out, [SampledToken(c.request, token) for c in out.chunks if c.samples])


def test_chunked_prefill_under_budget_and_decode_first() -> None:
    bm = BlockManager(64, 16)
    s = _scheduler(bm, max_num_batched_tokens=32)
    a, b = _req("a", 20), _req("b", 50)
    s.add(a)
    s.add(b)
    # STEP 1: a's whole prompt (20) + 12 tokens of b's.
    out = s.schedule()
    assert [(c.request.request_id, c.num_tokens) for c in out.chunks] == [("a", 20), ("b", 12)]
    _apply(s, out)
    # STEP 2: a decodes one token first, then b gets the remaining budget.
    out = s.schedule()
    assert [(c.request.request_id, c.num_tokens) for c in out.chunks] == [("a", 1), ("b", 31)]
    assert out.num_tokens == 32
    _apply(s, out)
    # STEP 3: b's last 7 prompt tokens, and a's decode.
    out = s.schedule()
    assert {(c.request.request_id, c.num_tokens) for c in out.chunks} == {("a", 1), ("b", 7)}
    for r in (a, b):
        s.remove(r)
        bm.free(r.finish("abort"))
    assert bm.all_free() and not s.has_work


def test_newest_request_is_preempted_when_pool_runs_dry() -> None:
    bm = BlockManager(4, 16)  # 64 tokens in all
    s = _scheduler(bm)
    a, b = _req("a", 32), _req("b", 32)
    s.add(a)
    s.add(b)
    _apply(s, s.schedule())  # both prompts fill the pool exactly
    assert bm.num_free_blocks == 0
    out = s.schedule()  # a needs a 3rd block for its next token: b goes back
    assert b.metrics.num_preemptions == 1 and b.state is RequestState.WAITING
    assert b.num_computed_tokens == 0 and not b.block_ids
    assert [c.request for c in out.chunks] == [a]
    assert list(s.waiting) == [b]
    for r in (a, b):
        s.remove(r)
        bm.free(r.finish("abort"))
    assert bm.all_free() and not s.has_work


class LetterTokenizer:
    """Token i decodes to one letter: enough for stop strings without a model."""

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(chr(ord("a") + i % 26) for i in ids)


def _run(s: Scheduler, req: Request, tokens: list[int]) -> list[Request]:
    """Schedule ``req`` step by step, sampling ``tokens`` in turn, until one finishes it."""
    s.add(req)
    for tok in tokens:
        finished = _apply(s, s.schedule(), tok)
        if finished:
            return finished
    return []


def _assert_done(s: Scheduler, req: Request, reason: str, stop_reason: object) -> None:
    assert req.state is RequestState.FINISHED
    assert (req.finish_reason, req.stop_reason) == (reason, stop_reason)
    assert not req.block_ids and s.blocks.all_free() and not s.has_work


def test_stop_token_id_finishes_and_frees_blocks() -> None:
    s = _scheduler(BlockManager(8, 16))
    req = _req("a", 20, stop_token_ids=(9,))
    assert _run(s, req, [5, 6, 9, 5]) == [req]
    assert req.output_token_ids == [5, 6, 9] and req.num_computed_tokens == 22
    _assert_done(s, req, "stop", 9)


def test_eos_stops_unless_ignored() -> None:
    s = _scheduler(BlockManager(8, 16))
    req = _req("a", 20)
    assert _run(s, req, [5, EOS]) == [req]
    _assert_done(s, req, "stop", None)
    req = _req("b", 20, ignore_eos=True, max_tokens=3)
    assert _run(s, req, [EOS, EOS, EOS]) == [req]
    assert req.output_token_ids == [EOS] * 3
    _assert_done(s, req, "length", None)


def test_max_tokens_and_max_model_len_are_length() -> None:
    s = _scheduler(BlockManager(8, 16), max_model_len=23)
    req = _req("a", 20, max_tokens=2)
    assert _run(s, req, [5] * 5) == [req]
    assert req.num_output_tokens == 2
    _assert_done(s, req, "length", None)
    req = _req("b", 20)  # max_tokens 100, but the context ends at 23 tokens
    assert _run(s, req, [5] * 5) == [req]
    assert req.num_tokens == 23
    _assert_done(s, req, "length", None)


def test_stop_string_cuts_the_text() -> None:
    s = _scheduler(BlockManager(8, 16), tokenizer=LetterTokenizer())
    req = _req("a", 20, stop=("mn",))
    s.stops.track(req)
    assert _run(s, req, [10, 11, 12, 13, 14]) == [req]  # "k", "l", "m", "n": stop
    assert req.text == "kl" and req.num_output_tokens == 4
    _assert_done(s, req, "stop", "mn")


def test_one_request_finishing_leaves_the_other_running() -> None:
    bm = BlockManager(8, 16)
    s = _scheduler(bm)
    a, b = _req("a", 20, max_tokens=1), _req("b", 20, max_tokens=3)
    s.add(a)
    s.add(b)
    assert _apply(s, s.schedule()) == [a]
    assert s.running == [b] and bm.num_free_blocks == bm.num_blocks - len(b.block_ids)
    s.finish(b, "abort")
    assert b.finish_reason == "abort" and bm.all_free() and not s.has_work
