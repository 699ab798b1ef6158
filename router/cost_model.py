"""``CostModelPolicy``: per request, the decode worker and plan with the lowest
predicted TTFT, from the workers' live state (router/worker_loads.py).

For a prompt of n tokens, decode worker D and prefill worker P, with c_D and c_P the
leading tokens each already caches (their prefix summaries)::

    queue  = P.pending / P.rate
    remote = max(queue + (n − c_P) / P.rate,
                 max(queue, D.backlog / D.link) + kv_bytes(n − c_D, encoding) / D.link)
    local  = D.pending / D.rate + (n − c_D) / D.rate

``pending`` is the worker's queue of uncomputed prompt tokens (or the prompt tokens
the router sent it to prefill and has no first token for yet, if more), ``rate`` its measured
prefill tokens/s, ``link`` the KV bytes/s D measured on its transfers and ``backlog``
the KV bytes of D's imports still to arrive: the prompt's KV streams layer by layer as
P computes it, so it starts with the compute and ends after the link has carried
what was ahead of it and its own bytes (link unknown: the transfer is taken to hide
behind the compute). ``encoding`` is D's default, or one of ``kv_encodings`` (int8 on
a slow link) where it is predicted faster beyond the tie band below. While D
has running requests, a LOCAL prefill must not stall them past a budget: a decode
worker with a step budget B (``decode_step_budget_s``) cuts its prefill chunks so a
step lasts ~B, so the prompt gets D.rate × (1 − decode_step / B); one without may
prefill LOCAL only when (n − c_D) / D.rate ≤ ``stall_budget_s``. A decode worker
that has not measured its own prefill rate is taken to prefill as fast as the
prefill worker.

Plans within ``TIE_RATIO`` (+ ``TIE_S``) of the best prediction count as equal: among
them the decode worker that caches most of the prompt wins (no bytes cross for it, and
the conversation's next turn finds its cache there too), then the one with the fewest
tokens in flight (the router's own count); ties rotate. Without
a fresh state or a measured rate the policy falls back to ``LoadAwarePolicy``'s
rule for that decision. Prompts shorter than ``local_prefill_below`` stay LOCAL
(the manual override). Each plan's prediction carries a learned offset: the moving
average of actual − predicted TTFT of that plan's requests so far (what the formula
leaves out: RPCs, admission, short prompts' lower rate). Each Choice carries its
prediction; the router logs it
beside the actual TTFT, so the model's error can be measured.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence, Set
from dataclasses import dataclass

from pdserve.worker_state import WorkerLoad
from router.policy import MAX_PREFILL_FALLBACKS, Choice, LoadAwarePolicy, Member

TIE_RATIO, TIE_S = 1.1, 0.001  # predictions within 10% + 1 ms are a tie
MIN_PREFILL_SHARE = 0.1  # of a step, what a budgeted decode worker leaves prefill at least
OFFSET_ALPHA = 0.1  # weight of the newest residual in the per-plan offset


@dataclass(frozen=True)
class _Plan:
    decode: Member
    prefill: Member | None
    ttft_s: float
    cached: int  # leading prompt tokens the decode worker holds
    kv_encoding: int = 0  # 0: the decode worker's default


@dataclass(frozen=True)
class _Remote:
    """One prefill worker's part of a remote plan, the same for every decode worker."""

    member: Member
    rate: float
    queue_s: float
    compute_s: float


class _CachedPrefix:
    """How many leading tokens of one prompt a worker caches; the prompt is hashed once
    per salt and block size, however many workers share them."""

    def __init__(self, tokens: Sequence[int]) -> None:
        self.tokens, self.n = tokens, len(tokens)
        self._hashes: dict[tuple[bytes, int], list[bytes]] = {}

    def __call__(self, load: WorkerLoad) -> int:
        if not load.prefix_salt or not load.cached_blocks:
            return 0
        key = (load.prefix_salt, load.block_size)
        if key not in self._hashes:
            self._hashes[key] = load.prompt_hashes(self.tokens)
        return load.cached_tokens(self._hashes[key])


class CostModelPolicy(LoadAwarePolicy):
    def __init__(self, decode: Sequence[str], prefill: Sequence[str], local_prefill_below: int,
                 loads: Callable[[str], WorkerLoad | None], stall_budget_s: float,
                 kv_encodings: Sequence[int] = ()) -> None:
        super().__init__(decode, prefill, local_prefill_below)
        self.loads = loads
        self.stall_budget_s = stall_budget_s
        self.kv_encodings = tuple(kv_encodings)  # may be asked for instead of the default
        # Per plan, a moving average of actual − predicted TTFT: what the model leaves
        # out (RPCs, admission, a short prompt's lower rate), learned from the answers.
        self.offset_s = {"local": 0.0, "remote": 0.0}
        self._predicted: dict[str, tuple[str, float]] = {}  # request id → plan, prediction

    def dispatched(self, request_id: str, choice: Choice, num_prompt_tokens: int) -> None:
        super().dispatched(request_id, choice, num_prompt_tokens)
        if choice.predicted_ttft_s is not None:
            self._predicted[request_id] = (choice.plan, choice.predicted_ttft_s)

    def prefill_finished(self, request_id: str, ttft_s: float | None = None) -> None:
        super().prefill_finished(request_id, ttft_s)
        plan, predicted = self._predicted.pop(request_id, ("", 0.0))
        if plan and ttft_s is not None:  # a step of the residual: its moving average
            self.offset_s[plan] += OFFSET_ALPHA * (ttft_s - predicted)

    def ended(self, request_id: str) -> None:
        super().ended(request_id)
        self._predicted.pop(request_id, None)

    def choose(self, tokens: Sequence[int], exclude: Set[str] = frozenset()) -> Choice | None:
        if len(tokens) < self.local_prefill_below:
            return super().choose(tokens, exclude)
        cached = _CachedPrefix(tokens)
        up = [m for m in self.prefill if m.address not in exclude]
        remotes = [r for r in (self._remote(m, cached) for m in up) if r is not None]
        plans = []
        for d in self.decode:
            load = self.loads(d.address) if d.address not in exclude else None
            if load is not None:
                plans += self._plans(len(tokens), d, load, cached(load), remotes, bool(up))
        if not plans:
            return super().choose(tokens, exclude)
        return self._pick(plans, up)

    def _remote(self, p: Member, cached: _CachedPrefix) -> _Remote | None:
        """A prefill worker with a measured rate: its queue and this prompt's compute."""
        pl = self.loads(p.address)
        if pl is None or pl.prefill_tokens_per_s <= 0:
            return None
        rate = pl.prefill_tokens_per_s
        return _Remote(p, rate, _pending(p, pl) / rate, (cached.n - cached(pl)) / rate)

    def _plans(self, n: int, d: Member, dl: WorkerLoad, c_d: int, remotes: list[_Remote],
               remote_possible: bool) -> list[_Plan]:
        out = [self._remote_plan(n, c_d, d, dl, r) for r in remotes]
        rate_p = max((r.rate for r in remotes), default=0.0)
        local = self._local(n - c_d, d, dl, dl.prefill_tokens_per_s or rate_p, remote_possible)
        if local is not None:
            out.append(_Plan(d, None, self._calibrated("local", local), c_d))
        return out

    def _remote_plan(self, n: int, c_d: int, d: Member, dl: WorkerLoad, r: _Remote) -> _Plan:
        """Prefill on ``r``, the KV sent to ``d`` in its default encoding, or in one of
        ``kv_encodings`` where that is faster beyond the tie band."""
        link = dl.kv_link_bytes_per_s
        if link <= 0:  # unmeasured: the transfer hides behind the compute
            return _Plan(d, r.member, self._calibrated("remote", r.queue_s + r.compute_s), c_d)
        link_free_s = max(r.queue_s, dl.kv_pending_bytes / link)

        def ttft(bytes_per_token: float) -> float:
            transfer = bytes_per_token * (n - c_d) / link
            return self._calibrated("remote", max(r.queue_s + r.compute_s,
                                                  link_free_s + transfer))

        best = _Plan(d, r.member, ttft(dl.kv_bytes_per_token), c_d)
        for enc in self.kv_encodings:
            size = dl.kv_bytes_per_token_by_encoding.get(enc)
            if size is not None and (t := ttft(size)) * TIE_RATIO + TIE_S < best.ttft_s:
                best = _Plan(d, r.member, t, c_d, enc)
        return best

    def _calibrated(self, plan: str, formula_s: float) -> float:
        """The formula plus the plan's learned offset; never below 0 (an offset learned
        from over-predictions is negative)."""
        return max(formula_s + self.offset_s[plan], 0.0)

    def _local(self, uncached: int, d: Member, dl: WorkerLoad, rate: float,
               remote_possible: bool) -> float | None:
        """Predicted TTFT of prefilling ``uncached`` tokens on this decode worker, or
        None where that is not allowed (or its rate is unknown)."""
        if rate <= 0:
            return None
        budget = dl.decode_step_budget_s
        if dl.num_running and budget > 0:
            # The worker cuts prefill chunks so a step lasts ~budget: the prompt gets
            # what the decode rows leave of each step.
            rate *= max(MIN_PREFILL_SHARE, 1.0 - dl.decode_step_s / budget)
        elif dl.num_running and remote_possible and uncached / rate > self.stall_budget_s:
            return None  # one unchunked stall longer than the budget
        return (_pending(d, dl) + uncached) / rate

    def _pick(self, plans: list[_Plan], up: list[Member]) -> Choice:
        best = min(p.ttft_s for p in plans)
        near = [p for p in plans if p.ttft_s <= best * TIE_RATIO + TIE_S]
        self._rotation += 1
        n = len(self.decode)
        plan = min(near, key=lambda p: (-p.cached, p.decode.in_flight_tokens,
                                        (self.decode.index(p.decode) - self._rotation) % n,
                                        p.ttft_s))
        if plan.prefill is None:
            return Choice(plan.decode, None, predicted_ttft_s=plan.ttft_s)
        rest = sorted((m for m in up if m is not plan.prefill),
                      key=lambda m: m.in_flight_requests)
        return Choice(plan.decode, plan.prefill,
                      tuple(m.address for m in rest[:MAX_PREFILL_FALLBACKS]),
                      predicted_ttft_s=plan.ttft_s, kv_encoding=plan.kv_encoding)


def _pending(m: Member, load: WorkerLoad) -> int:
    """The worker's prefill queue: what it last said, or more if the router has sent it
    more since (its state is up to an interval old; requests arrive in bursts)."""
    return max(load.pending_prefill_tokens, m.prefilling_tokens)
