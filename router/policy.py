"""Which decode worker, which prefill worker, and whether to disaggregate at all.

The router keeps its own count of what it sent each worker and is still running
(tokens for decode workers, requests for prefill workers): the least loaded
wins. Prompts shorter than ``local_prefill_below`` are prefilled on the decode
worker itself (plan LOCAL): for them a remote prefill plus a transfer costs more
than it saves.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Member:
    address: str
    in_flight_tokens: int = 0
    in_flight_requests: int = 0


@dataclass
class Choice:
    decode: Member
    prefill: Member | None  # None = plan LOCAL


@dataclass
class LoadAwarePolicy:
    decode: list[Member]
    prefill: list[Member]
    local_prefill_below: int = 16
    _rr: int = field(default=0)

    def choose(self, num_prompt_tokens: int, exclude: set[str] = frozenset()) -> Choice | None:  # type: ignore[assignment]
        candidates = [m for m in self.decode if m.address not in exclude]
        if not candidates:
            return None
        self._rr += 1  # tie-break by rotation so equal members share the load
        d = min(candidates, key=lambda m: (m.in_flight_tokens,
                                           (self.decode.index(m) - self._rr) % len(self.decode)))
        remote = self.prefill and num_prompt_tokens >= self.local_prefill_below
        p = min(self.prefill, key=lambda m: m.in_flight_requests) if remote else None
        return Choice(d, p)

    def set_members(self, decode: list[str], prefill: list[str]) -> None:
        """Replace the membership; members kept keep their in-flight counts."""
        known = {m.address: m for m in [*self.decode, *self.prefill]}
        self.decode = [known.get(a) or Member(a) for a in decode]
        self.prefill = [known.get(a) or Member(a) for a in prefill]

    @staticmethod
    def begin(c: Choice, tokens: int) -> None:
        c.decode.in_flight_tokens += tokens
        c.decode.in_flight_requests += 1
        if c.prefill is not None:
            c.prefill.in_flight_requests += 1

    @staticmethod
    def prefill_done(c: Choice) -> None:
        if c.prefill is not None:
            c.prefill.in_flight_requests -= 1
            c.prefill = None

    @staticmethod
    def end(c: Choice, tokens: int) -> None:
        c.decode.in_flight_tokens -= tokens
        c.decode.in_flight_requests -= 1
        LoadAwarePolicy.prefill_done(c)
