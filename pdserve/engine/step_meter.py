"""What this engine's steps cost, measured as they run: the prefill rate and the
decode step time the router's cost model predicts TTFT and stalls from.

Moving averages (weight ``ALPHA`` on the newest step): a step with at least
``MIN_PREFILL_TOKENS`` prefill tokens updates the prefill rate (tokens / the step's
seconds less one decode step when decode rows rode along, at least
``MIN_PREFILL_SHARE`` of it: the prompt's own rate, which a router scales by what
decoding leaves of each step); a step of decode rows only updates the decode step
time. Other steps (a few prefill tokens) say little about either and are skipped.
0 means not measured yet.
"""

from __future__ import annotations

ALPHA = 0.2
MIN_PREFILL_TOKENS = 32
MIN_PREFILL_SHARE = 0.25


class StepMeter:
    def __init__(self) -> None:
        self.prefill_tokens_per_s = 0.0
        self.decode_step_s = 0.0
        self.steps = 0

    def record(self, prefill_tokens: int, decode_rows: int, seconds: float) -> None:
        self.steps += 1
        if seconds <= 0:
            return
        if prefill_tokens >= MIN_PREFILL_TOKENS:
            # The decode rows riding along cost about a decode step: not the prompt's.
            riding = self.decode_step_s if decode_rows > 0 else 0.0
            prefill_s = max(seconds - riding, seconds * MIN_PREFILL_SHARE)
            self.prefill_tokens_per_s = _average(self.prefill_tokens_per_s,
                                                 prefill_tokens / prefill_s)
        elif prefill_tokens == 0 and decode_rows > 0:
            self.decode_step_s = _average(self.decode_step_s, seconds)


def _average(old: float, new: float) -> float:
    return new if old == 0.0 else (1 - ALPHA) * old + ALPHA * new
