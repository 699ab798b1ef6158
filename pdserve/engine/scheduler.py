"""Decides which tokens each step computes: continuous batching with chunked prefill.

There is no prefill or decode phase: every request wants its missing tokens
(``num_tokens - num_computed_tokens``) and each step hands out at most
``max_num_batched_tokens`` of them. Running requests come first, decode tokens
(one each) before prefill chunks, then waiting requests in arrival order. While
requests decode, ``prefill_cap`` may cut the prefill tokens of a step further, so
a prompt prefilled alongside stalls their next tokens by a bounded time.

KV blocks are allocated step by step as tokens are scheduled. When the pool is
empty, the newest running request is preempted (its blocks freed, its KV
recomputed later); a waiting request simply waits.

Prefix caching: a request admitted from the queue first takes the longest run of
cached blocks that matches its tokens (block hashes, pdserve/prefix_hash.py)
and computes only the rest; at least its last token is computed, so the step
samples. After each step, every block a request has filled is registered in the
cache, so the next request with that prefix (or this one, after a preemption)
finds it. ``prefix_queries``/``prefix_hits`` count tokens looked up and found.

After the forward pass, ``update`` applies the step: computed tokens counted,
sampled tokens appended, stop conditions checked (``StopChecker``), finished
requests removed and their blocks freed. The engine only runs the model and the
sampler in between.

Speculative decoding (with a ``drafter``): a greedy decode row may carry drafts,
guesses of its next tokens, computed in the same step (one token plus k drafts; it
costs k more of the budget and blocks for them). The engine keeps the drafts the
model agrees with, plus the model's own next token, and hands them to ``update`` as
consecutive ``SampledToken``s, each after the first marked ``draft``: its KV, computed
this step, stands. Rejected drafts' KV lies past ``num_computed_tokens``, never
read and written over later; the blocks that only they needed go back to the pool
and no block holding one is registered in the prefix cache. Drafts live only in the
``ScheduledChunk``, so preemption, abort and interruption see none.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from pdserve.engine.block_manager import BlockManager
from pdserve.engine.ngram_drafter import NgramDrafter
from pdserve.engine.request import Request, RequestState
from pdserve.engine.stop_checker import StopChecker
from pdserve.logprobs import Logprob
from pdserve.prefix_hash import extend_hashes


@dataclass
class ScheduledChunk:
    request: Request
    num_tokens: int  # tokens computed for this request this step, drafts included
    num_cached_tokens: int = 0  # on admission: leading tokens taken from the prefix cache
    draft_token_ids: list[int] = field(default_factory=list)  # after its one real token

    @property
    def samples(self) -> bool:
        """Whether this step catches the request up, so its logits sample a token."""
        r = self.request
        return r.num_computed_tokens + self.num_tokens - len(self.draft_token_ids) == r.num_tokens

    @property
    def is_decode(self) -> bool:
        """One token of a request that is decoding (with its drafts, if any)."""
        return self.num_tokens == 1 or bool(self.draft_token_ids)


@dataclass
class SchedulerOutput:
    chunks: list[ScheduledChunk] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks)


@dataclass
class SampledToken:
    """A token a step sampled for one request (a chunk that ``samples``); with drafts,
    one per accepted draft plus the model's next token, in order."""

    request: Request
    token_id: int
    logprob: Logprob | None = None
    draft: bool = False  # it follows an accepted draft, whose KV this step computed


class Scheduler:
    def __init__(self, blocks: BlockManager, max_num_batched_tokens: int, max_num_seqs: int,
                 stops: StopChecker, prefill_cap: Callable[[], int | None] = lambda: None,
                 drafter: NgramDrafter | None = None) -> None:
        self.blocks = blocks
        self.stops = stops
        self.drafter = drafter
        self.spec_drafts = 0  # decode rows that carried drafts
        self.spec_draft_tokens = 0  # drafts computed
        self.spec_accepted_tokens = 0  # of them, accepted
        self.token_budget = max_num_batched_tokens
        # Prefill tokens a step may add to decode rows (None: no cap; see
        # EngineConfig.decode_step_budget_s).
        self.prefill_cap = prefill_cap
        self.max_num_seqs = max_num_seqs
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.prefix_queries = 0  # tokens looked up in the prefix cache
        self.prefix_hits = 0  # of them, tokens found

    def counters(self) -> dict[str, int]:
        """Running totals under their metric names (pdserve/metrics.py ENGINE_COUNTERS)."""
        return {"prefix_cache_queries": self.prefix_queries,
                "prefix_cache_hits": self.prefix_hits,
                "spec_decode_num_drafts": self.spec_drafts,
                "spec_decode_num_draft_tokens": self.spec_draft_tokens,
                "spec_decode_num_accepted_tokens": self.spec_accepted_tokens}

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def add_running(self, request: Request) -> None:
        """A request whose KV was imported joins the running batch directly."""
        assert request.state is RequestState.RUNNING
        self.running.append(request)

    def remove(self, request: Request) -> None:
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.token_budget
        drafting = self.drafter is not None and self.drafter.drafts_allowed(len(self.running))
        cap = self.prefill_cap()
        decoding = [r for r in self.running if r.num_tokens - r.num_computed_tokens == 1] \
            if drafting or cap is not None else []  # else nobody asks
        drafts = {r.request_id: self._drafts(r) for r in decoding} if drafting else {}
        if cap is not None and decoding:  # an engine without a step budget skips it
            budget = min(budget, len(decoding) + sum(map(len, drafts.values())) + cap)
        budget, preempted = self._schedule_running(out, budget, drafts)
        if not preempted:  # the pool is short: admitting more would only thrash
            self._schedule_waiting(out, budget)
        return out

    def update(self, out: SchedulerOutput, sampled: list[SampledToken]) -> list[Request]:
        """Apply a computed step: count its tokens, append what it sampled; returns
        the requests that finished (their blocks are free)."""
        for c in out.chunks:
            c.request.num_computed_tokens += c.num_tokens - len(c.draft_token_ids)
            self.register_computed(c.request)
        finished = []
        for s in sampled:
            self.spec_accepted_tokens += s.draft  # counted even where a stop drops it
            if s.request.is_finished:
                continue  # an earlier token of this step ended it: drop the rest
            if s.draft:  # registered before the token that may finish the request
                s.request.num_computed_tokens += 1
                self.register_computed(s.request)
            if self.append(s.request, s.token_id, s.logprob):
                finished.append(s.request)
        for c in out.chunks:
            if c.draft_token_ids:
                self._settle_drafts(c)
        return finished

    def _drafts(self, req: Request) -> list[int]:
        """Drafts for a decoding request: only greedy ones past ``min_tokens``, never
        past ``max_tokens`` or the context."""
        p = req.params
        if not p.greedy or req.num_output_tokens < p.min_tokens or req.kv_exporter is not None:
            return []
        room = min(p.max_tokens - req.num_output_tokens,
                   self.stops.max_model_len - req.num_tokens) - 1
        return self.drafter.propose(req.all_token_ids, min(room, self.drafter.k)) \
            if self.drafter is not None and room > 0 else []

    def _settle_drafts(self, c: ScheduledChunk) -> None:
        """Count the chunk's drafts; give back the blocks only its rejected drafts
        needed (a finished request gave back all)."""
        r = c.request
        self.spec_drafts += 1
        self.spec_draft_tokens += len(c.draft_token_ids)
        if r.is_finished:
            return
        keep = self.blocks.blocks_for_tokens(r.num_computed_tokens)  # what a plain step leaves
        if len(r.block_ids) > keep:
            surplus, r.block_ids = r.block_ids[keep:], r.block_ids[:keep]
            self.blocks.free(surplus)

    def append(self, req: Request, token_id: int, logprob: Logprob | None) -> bool:
        """Give ``req`` its next token; finish it if that was its last. True if finished."""
        req.append_token(token_id, logprob)
        done = self.stops.check(req)
        if done is not None:
            self.finish(req, done.reason, done.stop_reason)
        return done is not None

    def finish(self, req: Request, reason: str, stop_reason: str | int | None = None) -> None:
        """Any state → FINISHED: out of the queues, blocks back to the pool."""
        self.remove(req)
        self.blocks.free(req.finish(reason, stop_reason))
        self.stops.release(req)

    def _schedule_running(self, out: SchedulerOutput, budget: int,
                          drafts: dict[str, list[int]]) -> tuple[int, bool]:
        # Decode tokens first so long prefills never stall token streams.
        queue = sorted(self.running, key=lambda r: r.num_tokens - r.num_computed_tokens > 1)
        rows_left = sum(1 for r in queue if r.num_tokens - r.num_computed_tokens == 1)
        preempted = False
        while queue and budget > 0:
            req = queue.pop(0)
            n = min(req.num_tokens - req.num_computed_tokens, budget)
            draft: list[int] = []
            if n == 1:  # drafts only from what the other decode rows leave of the budget
                rows_left -= 1
                draft = drafts.get(req.request_id, [])[: max(budget - 1 - rows_left, 0)]
                if draft and not self._grow(req, req.num_computed_tokens + 1 + len(draft)):
                    draft = []  # the pool is short: no drafts before preempting anyone
            while not self._grow(req, req.num_computed_tokens + n + len(draft)):
                victim = self._newest(queue) or req
                self._preempt(victim)
                preempted = True
                if victim is req:
                    break
                queue.remove(victim)
            else:
                out.chunks.append(ScheduledChunk(req, n + len(draft), draft_token_ids=draft))
                budget -= n + len(draft)
        return budget, preempted

    def _schedule_waiting(self, out: SchedulerOutput, budget: int) -> None:
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            req = self.waiting[0]
            hits = self.cached_prefix(req, req.num_tokens - 1)
            cached = len(hits) * self.blocks.block_size
            n = min(req.num_tokens - cached, budget)
            if not self.reserve(req, hits, cached + n):
                return
            self.waiting.popleft()
            req.start_running()
            self.running.append(req)
            out.chunks.append(ScheduledChunk(req, n, cached))
            budget -= n

    # --- the prefix cache -------------------------------------------------------------
    def cached_prefix(self, req: Request, max_tokens: int) -> list[int]:
        """Cached blocks holding ``req``'s first tokens, at most ``max_tokens`` of them."""
        if not self.blocks.enable_caching:
            return []
        bs = self.blocks.block_size
        extend_hashes(req.block_hashes, req.all_token_ids, bs, req.hash_salt, max_tokens)
        return self.blocks.match_prefix(req.block_hashes[: max_tokens // bs])

    def reserve(self, req: Request, hits: list[int], num_tokens: int) -> bool:
        """Give ``req`` (holding no blocks) the ``hits`` and new blocks up to
        ``num_tokens``; the hits count as computed. False if the pool is short."""
        need = self.blocks.blocks_for_tokens(num_tokens) - len(hits)
        if not self.blocks.can_allocate(need + self.blocks.num_reclaimed(hits)):
            return False
        self.blocks.take_cached(hits)
        req.block_ids = hits + self.blocks.allocate(need)
        req.num_registered_blocks = len(hits)
        req.num_computed_tokens = req.num_cached_tokens = len(hits) * self.blocks.block_size
        self.prefix_queries += req.num_tokens
        self.prefix_hits += req.num_cached_tokens
        return True

    def register_computed(self, req: Request) -> None:
        """Put every block ``req`` has filled into the prefix cache."""
        bs = self.blocks.block_size
        full = min(req.num_computed_tokens // bs, len(req.block_ids))
        if full <= req.num_registered_blocks or not self.blocks.enable_caching:
            return
        extend_hashes(req.block_hashes, req.all_token_ids, bs, req.hash_salt, full * bs)
        for i in range(req.num_registered_blocks, full):
            self.blocks.register(req.block_ids[i], req.block_hashes[i])
        req.num_registered_blocks = full

    def _newest(self, candidates: list[Request]) -> Request | None:
        """The most recently admitted request among ``candidates``."""
        for r in reversed(self.running):
            if r in candidates:
                return r
        return None

    def _grow(self, req: Request, num_tokens: int) -> bool:
        """Make ``req`` own enough blocks for ``num_tokens``; False if the pool is short."""
        need = self.blocks.blocks_for_tokens(num_tokens) - len(req.block_ids)
        if need <= 0:
            return True
        if not self.blocks.can_allocate(need):
            return False
        req.block_ids += self.blocks.allocate(need)
        return True

    def _preempt(self, req: Request) -> None:
        self.running.remove(req)
        self.blocks.free(req.preempt())
        self.waiting.appendleft(req)
