"""Prompt-lookup drafts for n-gram speculative decoding (vLLM's ``method: ngram``).

A request's next tokens are guessed from its own tokens (prompt and output so far):
the longest n-gram at their end, ``prompt_lookup_min`` ≤ n ≤ ``prompt_lookup_max``,
that also occurs earlier is looked up, and the tokens that followed its earliest
occurrence are the drafts. No model runs: a draft costs a byte search. Text that
quotes or repeats its context (summaries, code edits, grounded answers) gets long
runs of accepted drafts; free text gets few, and then no drafts at all.
"""

from __future__ import annotations

from array import array
from collections.abc import Sequence

_ITEM = array("i").itemsize  # token ids < 2**31


class NgramDrafter:
    def __init__(self, num_speculative_tokens: int, prompt_lookup_min: int,
                 prompt_lookup_max: int, disable_by_batch_size: int | None = None) -> None:
        self.k = num_speculative_tokens
        self.n_min, self.n_max = prompt_lookup_min, prompt_lookup_max
        self.max_batch = disable_by_batch_size  # more running requests: no drafts

    def drafts_allowed(self, num_running: int) -> bool:
        return self.max_batch is None or num_running <= self.max_batch

    def propose(self, tokens: Sequence[int], k: int | None = None) -> list[int]:
        """Up to ``k`` (default ``num_speculative_tokens``) draft tokens to follow
        ``tokens``; empty when no n-gram of the allowed lengths recurs."""
        k = self.k if k is None else k
        if k <= 0 or len(tokens) <= self.n_min:
            return []
        haystack = array("i", tokens).tobytes()
        # Search all but the last token: a match must have a token after it.
        searched = len(haystack) - _ITEM
        for n in range(min(self.n_max, len(tokens) - 1), self.n_min - 1, -1):
            start = _earliest(haystack, searched, haystack[-n * _ITEM:])
            if start is not None:
                return list(tokens[start + n: start + n + k])
        return []


def _earliest(haystack: bytes, end: int, needle: bytes) -> int | None:
    """The first token index where ``needle`` occurs within ``haystack[:end]``,
    aligned to whole tokens."""
    at = haystack.find(needle, 0, end)
    while at >= 0:
        if at % _ITEM == 0:
            return at // _ITEM
        at = haystack.find(needle, at + 1, end)
    return None
