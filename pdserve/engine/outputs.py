"""What the engine reports about a request after a step."""

from __future__ import annotations

from dataclasses import dataclass, field

from pdserve.engine.request import Request
from pdserve.logprobs import Logprob


@dataclass
class RequestTimings:
    ttft_s: float | None
    """Arrival to first token."""
    e2e_s: float | None
    """Arrival to finish (None while running)."""
    queue_s: float | None
    """Arrival to first scheduled."""
    num_preemptions: int = 0


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    """All output tokens so far."""
    text: str
    new_token_ids: list[int]
    """Tokens produced since the previous report of this request."""
    new_text: str
    finished: bool
    finish_reason: str | None
    """"stop" (EOS, stop token or stop string), "length" or "abort"."""
    stop_reason: str | int | None = None
    logprobs: list[Logprob] = field(default_factory=list)
    new_logprobs: list[Logprob] = field(default_factory=list)
    timings: RequestTimings | None = None
    num_cached_tokens: int = 0
    """Prompt tokens whose KV came from the prefix cache (vLLM's field)."""

    @classmethod
    def report(cls, r: Request) -> RequestOutput:
        """The request's state, with the part the caller has not seen as the delta."""
        m = r.metrics
        new_ids = r.output_token_ids[r.num_sent_tokens :]
        new_lps = r.logprobs[r.num_sent_tokens :] if r.logprobs else []
        new_text = r.text[r.num_sent_chars :]
        r.num_sent_tokens, r.num_sent_chars = r.num_output_tokens, len(r.text)
        t0 = m.arrival_time
        timings = RequestTimings(
            ttft_s=None if m.first_token_time is None else m.first_token_time - t0,
            e2e_s=None if m.finished_time is None else m.finished_time - t0,
            queue_s=None if m.first_scheduled_time is None else m.first_scheduled_time - t0,
            num_preemptions=m.num_preemptions,
        )
        return cls(
            request_id=r.request_id,
            prompt_token_ids=r.prompt_token_ids,
            token_ids=r.output_token_ids,
            text=r.text,
            new_token_ids=new_ids,
            new_text=new_text,
            finished=r.is_finished,
            finish_reason=r.finish_reason,
            stop_reason=r.stop_reason,
            logprobs=r.logprobs,
            new_logprobs=new_lps,
            timings=timings,
            num_cached_tokens=r.num_cached_tokens,
        )
