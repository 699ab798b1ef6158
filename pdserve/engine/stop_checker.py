"""When a request is done: stop token ids, EOS, stop strings, max_tokens, max_model_len.

Torch-free, so the scheduler can own the update step and be tested without a model.
Stop strings need the request's text: the checker keeps one incremental
detokenizer per request that asked for text (``track``) until it finishes
(``release``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pdserve.engine.detokenizer import IncrementalDetokenizer
from pdserve.engine.request import Request


@dataclass(frozen=True)
class Finish:
    reason: str  # "stop" or "length"
    stop_reason: str | int | None = None  # the stop id or string; None for EOS and length


class StopChecker:
    def __init__(self, eos_token_ids: tuple[int, ...], max_model_len: int,
                 tokenizer: Any = None) -> None:
        self.eos_token_ids = eos_token_ids
        self.max_model_len = max_model_len
        self.tokenizer = tokenizer
        self._detok: dict[str, IncrementalDetokenizer] = {}

    def track(self, req: Request) -> None:
        if req.params.detokenize and self.tokenizer is not None:
            self._detok[req.request_id] = IncrementalDetokenizer(self.tokenizer, req)

    def release(self, req: Request) -> None:
        self._detok.pop(req.request_id, None)

    def check(self, req: Request) -> Finish | None:
        """After ``req`` got a token: extend its text, say whether (and why) it is done."""
        token, p = req.all_token_ids[-1], req.params
        detok = self._detok.get(req.request_id)
        stop_str = detok.update() if detok is not None else None
        if token in p.stop_token_ids:
            return Finish("stop", token)
        if not p.ignore_eos and token in self.eos_token_ids:
            return Finish("stop")
        if stop_str is not None:
            return Finish("stop", stop_str)
        if req.num_output_tokens >= p.max_tokens or req.num_tokens >= self.max_model_len:
            return Finish("length")
        return None
