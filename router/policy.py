"""Which decode worker, which prefill worker, and whether to disaggregate at all.

``RoutingPolicy`` is the seam: ``choose`` picks a decode worker and a plan (LOCAL:
the decode worker prefills the prompt itself; REMOTE: on the prefill worker named,
with up to ``MAX_PREFILL_FALLBACKS`` others the decode worker asks in order when
that one fails) for a prompt, skipping excluded addresses (decode workers already
tried or down, prefill workers down: with none left, the plan is LOCAL); the router then tells the policy the
request's life, ``dispatched`` → ``prefill_finished`` (first token) → ``ended``
(also after a retry, an error or an abort), and every membership change.
``make_policy`` builds the one ``RouterConfig.policy`` names: ``cost_model``
(router/cost_model.py, the default: plan and workers by predicted TTFT from live
worker state) or ``load_aware`` (below: the router's own counts, a static plan).

``LoadAwarePolicy``: the router keeps its own count of what it sent each worker
and is still running (tokens for decode workers, requests for prefill workers):
the least loaded wins, ties rotate. Prompts shorter than ``local_prefill_below``
are prefilled on the decode worker itself: for them a remote prefill plus a
transfer costs more than it saves.

Per request, in the policy's accounting: DISPATCHED (decode tokens and prefill
request counted) → PREFILLED (prefill request released at the first token) →
ENDED (decode tokens released; forgotten).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence, Set
from dataclasses import dataclass
from typing import Protocol

from pdserve.config import KV_ENCODINGS, RouterConfig
from pdserve.worker_state import WorkerLoad

MAX_PREFILL_FALLBACKS = 2  # prefill workers a decode worker tries after the first


@dataclass
class Member:
    """One worker and what the router has in flight on it."""

    address: str
    in_flight_tokens: int = 0
    in_flight_requests: int = 0
    prefilling_tokens: int = 0  # prompt tokens sent here to prefill, first token not back


@dataclass(frozen=True)
class Choice:
    decode: Member
    prefill: Member | None  # None = plan LOCAL
    prefill_fallbacks: tuple[str, ...] = ()  # asked in order when ``prefill`` fails
    predicted_ttft_s: float | None = None  # the cost model's, when it decided
    kv_encoding: int = 0  # KVEncoding to ask the prefill worker for; 0: the decode default

    @property
    def plan(self) -> str:
        return "local" if self.prefill is None else "remote"


class RoutingPolicy(Protocol):
    def choose(self, tokens: Sequence[int], exclude: Set[str] = frozenset()) -> Choice | None:
        """A decode worker not in ``exclude`` and a plan for a prompt of ``tokens``
        (with the output so far, after a migration); None when there is none."""

    def dispatched(self, request_id: str, choice: Choice, num_prompt_tokens: int) -> None:
        """The request was sent to ``choice.decode``."""

    def prefill_finished(self, request_id: str, ttft_s: float | None = None) -> None:
        """Its first token arrived, ``ttft_s`` after dispatch: the prompt is prefilled."""

    def ended(self, request_id: str) -> None:
        """Its call on the decode worker is over (finished, failed, retried or aborted)."""

    def set_members(self, decode: Sequence[str], prefill: Sequence[str]) -> None:
        """Replace the membership (router/membership.py)."""


@dataclass
class _Load:
    """What one dispatched request counts on its workers."""

    decode: Member
    prefill: Member | None
    tokens: int
    prefilling: Member | None = None  # the member prefilling it, until its first token


class LoadAwarePolicy:
    def __init__(self, decode: Sequence[str], prefill: Sequence[str],
                 local_prefill_below: int) -> None:
        self.decode = [Member(a) for a in decode]
        self.prefill = [Member(a) for a in prefill]
        self.local_prefill_below = local_prefill_below
        self._rotation = 0
        self._loads: dict[str, _Load] = {}

    @property
    def in_flight(self) -> int:
        """Requests dispatched and not yet ended."""
        return len(self._loads)

    def choose(self, tokens: Sequence[int], exclude: Set[str] = frozenset()) -> Choice | None:
        candidates = [m for m in self.decode if m.address not in exclude]
        if not candidates:
            return None
        self._rotation += 1  # tie-break by rotation so equal members share the load
        n = len(self.decode)
        decode = min(candidates, key=lambda m: (
            m.in_flight_tokens, (self.decode.index(m) - self._rotation) % n))
        return self._with_prefill(decode, len(tokens), exclude)

    def _with_prefill(self, decode: Member, num_prompt_tokens: int,
                      exclude: Set[str]) -> Choice:
        """REMOTE on the least loaded prefill worker not excluded, the next least
        loaded as fallbacks; LOCAL for a short prompt or with none left."""
        up = [m for m in self.prefill if m.address not in exclude]
        if not up or num_prompt_tokens < self.local_prefill_below:
            return Choice(decode, None)
        first, *rest = sorted(up, key=lambda m: m.in_flight_requests)  # stable: ties by order
        return Choice(decode, first, tuple(m.address for m in rest[:MAX_PREFILL_FALLBACKS]))

    def dispatched(self, request_id: str, choice: Choice, num_prompt_tokens: int) -> None:
        load = _Load(choice.decode, choice.prefill, num_prompt_tokens,
                     choice.prefill or choice.decode)
        self._loads[request_id] = load
        load.decode.in_flight_tokens += load.tokens
        load.decode.in_flight_requests += 1
        load.prefilling.prefilling_tokens += load.tokens  # type: ignore[union-attr]
        if load.prefill is not None:
            load.prefill.in_flight_requests += 1

    def prefill_finished(self, request_id: str, ttft_s: float | None = None) -> None:
        load = self._loads.get(request_id)
        if load is not None and load.prefilling is not None:
            load.prefilling.prefilling_tokens -= load.tokens
            load.prefilling = None
        if load is not None and load.prefill is not None:
            load.prefill.in_flight_requests -= 1
            load.prefill = None

    def ended(self, request_id: str) -> None:
        self.prefill_finished(request_id)
        load = self._loads.pop(request_id, None)
        if load is not None:
            load.decode.in_flight_tokens -= load.tokens
            load.decode.in_flight_requests -= 1

    def set_members(self, decode: Sequence[str], prefill: Sequence[str]) -> None:
        """Members kept keep their in-flight counts (requests in flight count on the
        Member they were dispatched to, so a member removed and re-added starts at 0)."""
        known = {m.address: m for m in [*self.decode, *self.prefill]}
        self.decode = [known.get(a) or Member(a) for a in decode]
        self.prefill = [known.get(a) or Member(a) for a in prefill]


@dataclass(frozen=True)
class PolicyInputs:
    """What a policy may read besides its config: workers' live state (None: no fresh
    state)."""

    loads: Callable[[str], WorkerLoad | None] = lambda address: None


def _load_aware(config: RouterConfig, inputs: PolicyInputs) -> RoutingPolicy:
    return LoadAwarePolicy(config.decode, config.prefill, config.local_prefill_below)


def _cost_model(config: RouterConfig, inputs: PolicyInputs) -> RoutingPolicy:
    from router.cost_model import CostModelPolicy

    return CostModelPolicy(config.decode, config.prefill, config.local_prefill_below,
                           inputs.loads, config.local_prefill_stall_s,
                           tuple(KV_ENCODINGS.index(e) for e in config.kv_encodings))


# One entry per name in pdserve.config.ROUTING_POLICIES.
POLICIES: dict[str, Callable[[RouterConfig, PolicyInputs], RoutingPolicy]] = {
    "cost_model": _cost_model, "load_aware": _load_aware}


def make_policy(config: RouterConfig, inputs: PolicyInputs | None = None) -> RoutingPolicy:
    return POLICIES[config.policy](config, inputs or PolicyInputs())
