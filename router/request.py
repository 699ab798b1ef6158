"""A generation request and its answer in the router's domain types, and the
request's validation (tokenized; model, token ids and context length checked).

Both front doors (router/servicer.py for gRPC, router/openai_protocol.py for
HTTP) convert their wire format to these types at one point.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field

from pdserve.logprobs import Logprob
from pdserve.sampling_params import SamplingParams
from router.tokenizer import PromptTokenizer


@dataclass(frozen=True)
class GenerateRequest:
    """Exactly one of text, messages and token_ids is set."""

    params: SamplingParams
    request_id: str = ""
    model: str = ""
    text: str | None = None
    messages: list[dict[str, str]] | None = None
    token_ids: list[int] | None = None
    kv_encoding: int = 0
    timeout: float | None = None
    # OpenAI rule: prompt + max_tokens must fit the context (else the engine stops at it).
    check_context: bool = False
    # No max_tokens given (OpenAI chat): generate up to the end of the context.
    fill_context: bool = False


@dataclass
class Timings:
    ttft_s: float = 0.0
    e2e_s: float = 0.0
    prefill_compute_s: float = 0.0
    kv_transfer_s: float = 0.0
    kv_bytes: int = 0
    plan: str = ""
    predicted_ttft_s: float = 0.0  # dispatch to first token, by the cost model; 0: none


@dataclass
class Delta:
    request_id: str
    token_ids: list[int]
    text: str
    logprobs: list[Logprob] = field(default_factory=list)
    finish_reason: str = ""  # set on the last delta, with usage and timings
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0  # of prompt_tokens, whose KV came from a prefix cache
    timings: Timings | None = None


class GenerationError(Exception):
    """``code`` is a gRPC status name (INVALID_ARGUMENT, NOT_FOUND, UNAVAILABLE, ...)."""

    def __init__(self, code: str, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.code, self.message, self.param = code, message, param


PROMPT_CHARS_PER_TOKEN = 16
"""The default prompt-size limit: this many characters per token of context, far
more than any tokenizer packs into a token, so only prompts that cannot fit fail."""


def prompt_chars_limit(max_model_len: int, configured: int | None) -> int:
    return configured if configured is not None else PROMPT_CHARS_PER_TOKEN * max_model_len


def validate_request(req: GenerateRequest, model_id: str, tokenizer: PromptTokenizer,
                     max_model_len: int, max_prompt_chars: int | None = None,
                     ) -> tuple[list[int], SamplingParams]:
    """The prompt's token ids and the params to run it with, else ``GenerationError``.
    Tokenizes: run it off the event loop."""
    if req.model and req.model != model_id:
        raise GenerationError("NOT_FOUND", f"The model `{req.model}` does not exist "
                              f"(this server serves `{model_id}`).", "model")
    param = "messages" if req.messages is not None else "prompt"
    _check_size(req, param, prompt_chars_limit(max_model_len, max_prompt_chars), max_model_len)
    _check_ids("stop_token_ids", req.params.stop_token_ids, tokenizer.vocab_size)
    try:
        prompt = _tokenize(req, tokenizer)
    except ValueError as e:
        raise GenerationError("INVALID_ARGUMENT", str(e), param) from e
    if not prompt:
        raise GenerationError("INVALID_ARGUMENT", "prompt must contain at least 1 token, "
                              "got an empty prompt", param)
    _check_ids("prompt token ids", prompt, tokenizer.vocab_size, param)
    n, p, params = max_model_len, len(prompt), req.params
    if req.fill_context and p < n:
        params = dataclasses.replace(params, max_tokens=max(n - p, params.min_tokens))
    c = params.max_tokens
    if req.check_context and p + c > n:
        raise GenerationError(
            "INVALID_ARGUMENT", f"This model's maximum context length is {n} tokens. "
            f"However, you requested {p + c} tokens ({p} in the messages, {c} in the "
            "completion). Please reduce the length of the messages or completion.", param)
    if p >= n:
        raise GenerationError("INVALID_ARGUMENT", f"prompt has {p} tokens; it must be "
                              f"shorter than the context (max_model_len={n})", param)
    return prompt, params


def _check_size(req: GenerateRequest, param: str, max_chars: int, max_model_len: int) -> None:
    """Before tokenizing: a prompt that cannot fit the context is refused at once
    rather than after seconds of tokenizer time."""
    if req.token_ids is not None:
        size, unit, limit = len(req.token_ids), "tokens", max_model_len
    else:
        size = len(req.text or "") + sum(len(m.get("content", "")) + len(m.get("role", ""))
                                         for m in req.messages or [])
        unit, limit = "characters", max_chars
    if size > limit:
        raise GenerationError("INVALID_ARGUMENT", f"{param} is too long: {size} {unit}, at "
                              f"most {limit} accepted (max_model_len={max_model_len})", param)


def _check_ids(field: str, ids: Sequence[int], vocab_size: int, param: str | None = None) -> None:
    bad = next((t for t in ids if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise GenerationError("INVALID_ARGUMENT", f"{field} must be in [0, {vocab_size}), "
                              f"got {bad}", param or field)


def _tokenize(req: GenerateRequest, tokenizer: PromptTokenizer) -> list[int]:
    if req.text is not None:
        return tokenizer.encode(req.text)
    if req.messages is not None:
        return tokenizer.apply_chat_template(req.messages)
    if req.token_ids is not None:
        return list(req.token_ids)
    raise ValueError("prompt: give text, chat messages or token_ids")

