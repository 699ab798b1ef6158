"""OpenAI request bodies → domain requests, domain results → OpenAI JSON.

Field checks name the offending field in ``BadRequest.param`` (the OpenAI error
envelope's ``param``). Shapes follow OpenAI and vLLM: completions ``logprobs`` is
an int (top-k) answered with ``tokens``/``token_logprobs``/``top_logprobs``/
``text_offset``; chat ``logprobs`` is a bool plus ``top_logprobs`` answered with
``content: [{token, logprob, bytes, top_logprobs}]``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from pdserve.logprobs import Logprob
from pdserve.sampling_params import (
    INT32_MAX,
    MAX_STOP_CHARS,
    MAX_STOP_STRINGS,
    SamplingParams,
)
from router.request import GenerateRequest

MAX_N = 16
MAX_TOP_LOGPROBS = 20
MAX_PROMPTS = 64  # prompts in one completions batch
MAX_JSON_DEPTH = 32
_SEED_LIMIT = 2**63
_PENALTIES = ("presence_penalty", "frequency_penalty")


class BadRequest(Exception):
    def __init__(self, message: str, param: str | None = None, status: int = 400,
                 code: str | None = None, kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.message, self.param, self.status, self.code, self.kind = (
            message, param, status, code, kind)

    def envelope(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param,
                          "code": self.code}}


@dataclass
class ParsedRequest:
    chat: bool
    model: str
    prompts: list[GenerateRequest]  # one per prompt; each runs n times
    n: int = 1
    stream: bool = False
    include_usage: bool = False
    logprobs: int | None = None  # top-k asked for, None = no logprobs
    extra: dict[str, Any] = field(default_factory=dict)

    def requests(self, base_id: str) -> list[GenerateRequest]:
        """Choice i of prompt p has index p * n + i; seeds differ per choice."""
        out = []
        for p, req in enumerate(self.prompts):
            for i in range(self.n):
                index = p * self.n + i
                params = req.params
                if params.seed is not None and i:
                    params = replace(params, seed=(params.seed + i) % _SEED_LIMIT)
                rid = base_id if len(self.prompts) * self.n == 1 else f"{base_id}-{index}"
                out.append(replace(req, request_id=rid, params=params))
        return out


def parse_json(raw: bytes) -> Any:
    """The request body as JSON, else ``BadRequest``: malformed, nested too deep, or
    holding a string that is not valid Unicode (a lone surrogate such as "\\ud800",
    which no tokenizer can encode). Runs in a thread for large bodies."""
    try:
        body = json.loads(raw)
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, a 5,000-digit integer
        raise BadRequest(f"the request body is not valid JSON: {e}") from None
    except RecursionError:
        raise BadRequest(f"the request body is nested deeper than {MAX_JSON_DEPTH} levels") \
            from None
    _check_json(body, None, 0)
    return body


def _check_json(value: Any, param: str | None, depth: int) -> None:
    """Walks the body once; ``param`` is the top-level field being walked."""
    if depth > MAX_JSON_DEPTH:
        raise BadRequest(f"{param or 'the request body'} is nested deeper than "
                         f"{MAX_JSON_DEPTH} levels", param)
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise BadRequest(f"{param or 'a field name'} holds a string that is not valid "
                             "Unicode (a lone surrogate)", param) from None
    elif isinstance(value, dict):
        for k, v in value.items():
            _check_json(k, param, depth + 1)
            _check_json(v, param or k, depth + 1)
    elif isinstance(value, list):
        for v in value:
            _check_json(v, param, depth + 1)


def parse_completion(body: Any) -> ParsedRequest:
    body = _object(body)
    prompts = _prompts(body.get("prompt"))
    logprobs = _int(body, "logprobs", 0, MAX_TOP_LOGPROBS)
    if body.get("echo"):
        raise BadRequest("echo is not supported", "echo")
    params = _params(body, body.get("max_tokens"), "max_tokens", 16, logprobs)
    reqs = [GenerateRequest(params=params, model=_model(body), check_context=True, **p)
            for p in prompts]
    return _finish(body, False, reqs, logprobs)


def parse_chat(body: Any) -> ParsedRequest:
    body = _object(body)
    messages = _messages(body.get("messages"))
    want = _bool(body, "logprobs", False)
    top = _int(body, "top_logprobs", 0, MAX_TOP_LOGPROBS)
    if top is not None and not want:
        raise BadRequest("top_logprobs needs logprobs: true", "top_logprobs")
    logprobs = (top or 0) if want else None
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None \
        else "max_tokens"
    params = _params(body, body.get(name), name, None, logprobs)
    req = GenerateRequest(params=params, model=_model(body), messages=messages,
                          check_context=True, fill_context=body.get(name) is None)
    return _finish(body, True, [req], logprobs)


def _finish(body: dict[str, Any], chat: bool, reqs: list[GenerateRequest],
            logprobs: int | None) -> ParsedRequest:
    stream = _bool(body, "stream", False)
    options = body.get("stream_options")
    if options is not None and not stream:
        raise BadRequest("stream_options is only allowed when stream is true", "stream_options")
    if options is not None and not isinstance(options, dict):
        raise BadRequest("stream_options must be an object", "stream_options")
    include_usage = _bool(options or {}, "include_usage", False, "stream_options.include_usage")
    n = _int(body, "n", 1, MAX_N) or 1
    return ParsedRequest(chat, _model(body), reqs, n, stream, include_usage, logprobs)


def _object(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    return body


def _model(body: dict[str, Any]) -> str:
    model = body.get("model", "")
    if model is not None and not isinstance(model, str):
        raise BadRequest("model must be a string", "model")
    return model or ""


def _prompts(prompt: Any) -> list[dict[str, Any]]:
    """A string, a list of token ids, or a batch (list) of either."""
    if isinstance(prompt, str):
        return [{"text": prompt}]
    if _token_ids(prompt):
        return [{"token_ids": list(prompt)}]
    if isinstance(prompt, list) and len(prompt) > MAX_PROMPTS:
        raise BadRequest(f"prompt may hold at most {MAX_PROMPTS} prompts, got {len(prompt)}",
                         "prompt")
    if isinstance(prompt, list) and prompt and all(
            isinstance(p, str) or _token_ids(p) for p in prompt):
        return [{"text": p} if isinstance(p, str) else {"token_ids": list(p)} for p in prompt]
    raise BadRequest("prompt must be a string, a list of token ids, or a non-empty list of "
                     "either", "prompt")


def _token_ids(x: Any) -> bool:
    return isinstance(x, list) and bool(x) and all(
        isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in x)


def _messages(messages: Any) -> list[dict[str, str]]:
    if not isinstance(messages, list) or not messages:
        raise BadRequest("messages must be a non-empty list of {role, content} objects",
                         "messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise BadRequest(f"messages[{i}] must be an object with a string role", "messages")
        out.append({"role": m["role"], "content": _content(m.get("content"), i)})
    return out


def _content(content: Any, i: int) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                         and isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    raise BadRequest(f"messages[{i}].content must be a string or a list of text parts",
                     "messages")


def _params(body: dict[str, Any], max_tokens: Any, max_name: str, default_max: int | None,
            logprobs: int | None) -> SamplingParams:
    for name in _PENALTIES:
        if body.get(name) not in (None, 0, 0.0):
            raise BadRequest(f"{name} is not supported by this server (only 0)", name)
    given = _int({max_name: max_tokens}, max_name, 1, INT32_MAX)
    min_tokens = _int(body, "min_tokens", 0, INT32_MAX) or 0
    limit, limit_name = (given, max_name) if given is not None else (default_max, "the default "
                                                                      "max_tokens")
    if limit is not None and min_tokens > limit:
        raise BadRequest(f"min_tokens must be <= {limit_name} ({limit}), got {min_tokens}",
                         "min_tokens")
    # No max_tokens and no default (chat): a placeholder that fill_context replaces.
    size = given or default_max or max(1, min_tokens)
    try:
        return SamplingParams(
            max_tokens=size, temperature=_number(body, "temperature", 0.0, 2.0, 1.0),
            top_p=_number(body, "top_p", 0.0, 1.0, 1.0, low_open=True),
            top_k=_int(body, "top_k", -1, INT32_MAX) or -1,
            seed=_int(body, "seed", 0, _SEED_LIMIT - 1),
            stop=_stop(body.get("stop")), ignore_eos=_bool(body, "ignore_eos", False),
            min_tokens=min_tokens, logprobs=logprobs)
    except ValueError as e:  # a rule only SamplingParams knows; its message names the field
        raise BadRequest(str(e), str(e).split(" ", 1)[0]) from None


def _stop(stop: Any) -> tuple[str, ...]:
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if not (isinstance(stops, list) and len(stops) <= MAX_STOP_STRINGS and all(
            isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS for s in stops)):
        raise BadRequest(f"stop must be a non-empty string or a list of at most "
                         f"{MAX_STOP_STRINGS} of them, each at most {MAX_STOP_CHARS} characters",
                         "stop")
    return tuple(stops)


def _int(body: dict[str, Any], name: str, lo: int, hi: int | None) -> int | None:
    v = body.get(name)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or v < lo or (hi is not None and v > hi):
        allowed = f"an integer in [{lo}, {hi}]" if hi is not None else f"an integer >= {lo}"
        raise BadRequest(f"{name} must be {allowed}, got {_shown(v)}", name)
    return v


def _number(body: dict[str, Any], name: str, lo: float, hi: float, default: float,
            low_open: bool = False) -> float:
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or \
            (isinstance(v, float) and not math.isfinite(v)) or \
            v > hi or v < lo or (low_open and v == lo):
        raise BadRequest(f"{name} must be a number in {'(' if low_open else '['}{lo}, {hi}], "
                         f"got {_shown(v)}", name)
    return float(v)


def _bool(body: dict[str, Any], name: str, default: bool, param: str | None = None) -> bool:
    v = body.get(name)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise BadRequest(f"{param or name} must be true or false, got {_shown(v)}", param or name)
    return v


def _shown(v: Any) -> str:
    """A hostile value, short enough to quote in an error message."""
    text = repr(v)
    return text if len(text) <= 80 else text[:77] + "..."


# ---- responses ----------------------------------------------------------------------------

TokenText = Callable[[int], str]


def completion_logprobs(lps: list[Logprob], text: TokenText, offset: int) -> dict[str, Any]:
    tokens = [text(lp.token_id) for lp in lps]
    offsets, pos = [], offset
    for t in tokens:
        offsets.append(pos)
        pos += len(t)
    return {"tokens": tokens, "token_logprobs": [lp.logprob for lp in lps],
            "top_logprobs": [{**{text(t): v for t, v in lp.top}, text(lp.token_id): lp.logprob}
                             for lp in lps],
            "text_offset": offsets}


def chat_logprobs(lps: list[Logprob], text: TokenText) -> dict[str, Any]:
    def entry(token_id: int, logprob: float) -> dict[str, Any]:
        t = text(token_id)
        return {"token": t, "logprob": logprob, "bytes": list(t.encode())}

    return {"content": [{**entry(lp.token_id, lp.logprob),
                         "top_logprobs": [entry(t, v) for t, v in lp.top]} for lp in lps]}


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0,
          ) -> dict[str, Any]:
    """OpenAI's usage object; ``prompt_tokens_details.cached_tokens``: prompt tokens whose
    KV came from a prefix cache instead of being computed."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}
