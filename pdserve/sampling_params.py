"""Per-request sampling parameters, shaped like vLLM's ``SamplingParams``."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

INT32_MAX = 2**31 - 1
SEED_LIMIT = 2**64  # seeds are uint64 on the wire
MAX_STOP_STRINGS = 64
MAX_STOP_CHARS = 1024
MAX_STOP_TOKEN_IDS = 1024
MAX_LOGPROBS = 20


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens and when to stop. Validated on construction."""

    max_tokens: int = 16
    temperature: float = 1.0
    """0 means greedy."""
    top_p: float = 1.0
    top_k: int = -1
    """-1 (or 0) disables top-k."""
    seed: int | None = None
    """Per-request seed: the same seed gives the same tokens, on any worker."""
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    min_tokens: int = 0
    logprobs: int | None = None
    """None: no logprobs; k >= 0: the sampled token's logprob plus the top-k."""
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    detokenize: bool = True
    extra: dict[str, object] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        else:
            object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        _check(
            isinstance(self.max_tokens, int) and self.max_tokens >= 1,
            f"max_tokens must be an integer >= 1, got {self.max_tokens!r}",
        )
        _check(_finite(self.temperature) and self.temperature >= 0,
               f"temperature must be a finite number >= 0, got {self.temperature!r}")
        _check(_finite(self.top_p) and 0 < self.top_p <= 1,
               f"top_p must be in (0, 1], got {self.top_p!r}")
        _check(
            isinstance(self.top_k, int) and -1 <= self.top_k <= INT32_MAX,
            f"top_k must be -1 (disabled), 0 (disabled) or in [1, {INT32_MAX}], "
            f"got {self.top_k!r}",
        )
        if self.seed is not None:
            _check(isinstance(self.seed, int) and 0 <= self.seed < SEED_LIMIT,
                   f"seed must be an integer in [0, {SEED_LIMIT - 1}], got {self.seed!r}")
        _check(self.min_tokens >= 0, f"min_tokens must be >= 0, got {self.min_tokens!r}")
        _check(
            self.min_tokens <= self.max_tokens,
            f"min_tokens must be <= max_tokens ({self.max_tokens}), got {self.min_tokens!r}",
        )
        if self.logprobs is not None:
            _check(0 <= self.logprobs <= MAX_LOGPROBS,
                   f"logprobs must be in [0, {MAX_LOGPROBS}], got {self.logprobs!r}")
        self._check_stops()

    def _check_stops(self) -> None:
        _check(len(self.stop) <= MAX_STOP_STRINGS,
               f"stop must hold at most {MAX_STOP_STRINGS} strings, got {len(self.stop)}")
        _check(all(isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS for s in self.stop),
               f"stop must hold non-empty strings of at most {MAX_STOP_CHARS} characters")
        _check(len(self.stop_token_ids) <= MAX_STOP_TOKEN_IDS,
               f"stop_token_ids must hold at most {MAX_STOP_TOKEN_IDS} ids, "
               f"got {len(self.stop_token_ids)}")
        # The vocabulary bound is the engine's (it knows its model): LLMEngine.add_request.
        _check(all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids),
               "stop_token_ids must be integers >= 0")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def _finite(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
