"""A sampled token's log-probability and its top alternatives (no torch: the router
relays these too)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Logprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]
    """The top-k (token id, logprob) pairs, most likely first."""
