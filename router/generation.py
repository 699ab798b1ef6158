"""One generation stream, shared by the gRPC ``Generation`` service and the
OpenAI-compatible HTTP API (both convert their wire format to these types at one
point; nothing here knows protobuf or JSON).

Per request: RECEIVED (waiting) → VALIDATED (tokenized, params and context length
checked, else ``GenerationError(INVALID_ARGUMENT, param=...)``) → ROUTED (decode
worker and plan chosen; a full decode worker answers RESOURCE_EXHAUSTED and the
next one is tried) → STREAMING (running; relay of the decode worker's stream) →
DONE. Closing the stream (client gone), ``abort`` and the deadline all cancel the
decode worker's call, which cancels the prefill call.
"""

from __future__ import annotations

import dataclasses
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from pdserve.logprobs import Logprob
from pdserve.metrics import RouterMetrics
from pdserve.sampling_params import SamplingParams
from router.decode_client import DecodeCall, DecodeClients, DecodeDelta, WorkerError
from router.health import DecodeHealth
from router.policy import Choice, LoadAwarePolicy
from router.tokenizer import RouterTokenizer

log = logging.getLogger(__name__)


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


@dataclass
class Delta:
    request_id: str
    token_ids: list[int]
    text: str
    logprobs: list[Logprob] = field(default_factory=list)
    finish_reason: str = ""  # set on the last delta, with usage and timings
    prompt_tokens: int = 0
    completion_tokens: int = 0
    timings: Timings | None = None


class GenerationError(Exception):
    """``code`` is a gRPC status name (INVALID_ARGUMENT, NOT_FOUND, UNAVAILABLE, ...)."""

    def __init__(self, code: str, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.code, self.message, self.param = code, message, param


@dataclass
class _Flight:
    """One request between dispatch and its end."""

    request_id: str
    prompt_len: int
    t0: float
    call: DecodeCall | None = None  # set on dispatch to a decode worker
    aborted: bool = False


class Generator:
    def __init__(self, model_id: str, tokenizer: RouterTokenizer, policy: LoadAwarePolicy,
                 max_model_len: int, decode: DecodeClients, metrics: RouterMetrics,
                 health: DecodeHealth | None = None) -> None:
        self.model_id = model_id
        self.tokenizer = tokenizer
        self.policy = policy
        self.max_model_len = max_model_len
        self.decode = decode
        self.metrics = metrics
        self.health = health
        self.draining = False
        self._tokenizing = 0
        self._flights: dict[str, _Flight] = {}
        metrics.watch(lambda: self.running - self.waiting, lambda: self.waiting)

    @property
    def running(self) -> int:
        """Every request the router holds, dispatched or not."""
        return len(self._flights)

    @property
    def waiting(self) -> int:
        """Requests not yet dispatched to a decode worker."""
        return self._tokenizing + sum(f.call is None for f in self._flights.values())

    def abort(self, request_id: str) -> bool:
        f = self._flights.get(request_id)
        if f is None or f.call is None:
            return False
        f.aborted = True
        f.call.cancel()
        return True

    async def generate(self, req: GenerateRequest) -> AsyncIterator[Delta]:
        t0 = time.perf_counter()
        rid = req.request_id or f"req-{uuid.uuid4().hex[:16]}"
        self._tokenizing += 1
        try:
            prompt, params = self._admit(rid, req)
            req = dataclasses.replace(req, params=params)
            flight = _Flight(rid, len(prompt), t0)
            self._flights[rid] = flight
        finally:
            self._tokenizing -= 1
        try:
            async for delta in self._route(flight, prompt, req):
                yield delta
        finally:
            del self._flights[rid]

    def _admit(self, rid: str, req: GenerateRequest) -> tuple[list[int], SamplingParams]:
        if self.draining:
            raise GenerationError("UNAVAILABLE", "the router is draining; retry elsewhere")
        if self.health is not None and not self.health.usable:
            raise GenerationError("UNAVAILABLE", "no decode worker is reachable")
        if rid in self._flights:
            raise GenerationError("ALREADY_EXISTS", f"request_id {rid!r} is in use", "request_id")
        return self._validate(req)

    def _validate(self, req: GenerateRequest) -> tuple[list[int], SamplingParams]:
        if req.model and req.model != self.model_id:
            raise GenerationError("NOT_FOUND", f"The model `{req.model}` does not exist "
                                  f"(this server serves `{self.model_id}`).", "model")
        param = "messages" if req.messages is not None else "prompt"
        try:
            prompt = self._tokenize(req)
        except ValueError as e:
            raise GenerationError("INVALID_ARGUMENT", str(e), param) from e
        if not prompt:
            raise GenerationError("INVALID_ARGUMENT", "prompt must contain at least 1 token, "
                                  "got an empty prompt", param)
        bad = next((t for t in prompt if not 0 <= t < self.tokenizer.vocab_size), None)
        if bad is not None:
            raise GenerationError("INVALID_ARGUMENT", f"prompt token ids must be in "
                                  f"[0, {self.tokenizer.vocab_size}), got {bad}", param)
        n, p, params = self.max_model_len, len(prompt), req.params
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

    def _tokenize(self, req: GenerateRequest) -> list[int]:
        if req.text is not None:
            return self.tokenizer.encode(req.text)
        if req.messages is not None:
            return self.tokenizer.apply_chat_template(req.messages)
        if req.token_ids is not None:
            return list(req.token_ids)
        raise ValueError("prompt: give text, chat messages or token_ids")

    async def _route(self, f: _Flight, prompt: list[int], req: GenerateRequest,
                     ) -> AsyncIterator[Delta]:
        tried: set[str] = set()
        while True:
            down = self.health.down() if self.health is not None else set()
            choice = self.policy.choose(len(prompt), tried | down)
            if choice is None:
                code = "RESOURCE_EXHAUSTED" if tried else "UNAVAILABLE"
                raise GenerationError(code, "every decode worker is full; retry later" if tried
                                      else "no decode worker is reachable")
            tried.add(choice.decode.address)
            try:
                async for delta in self._relay(f, prompt, req, choice):
                    yield delta
                return
            except _Retry:
                continue

    async def _relay(self, f: _Flight, prompt: list[int], req: GenerateRequest,
                     choice: Choice) -> AsyncIterator[Delta]:
        plan = "remote" if choice.prefill else "local"
        f.call = self.decode.generate(choice.decode.address, f.request_id, prompt, req.params,
                                      choice.prefill.address if choice.prefill else None,
                                      req.kv_encoding, req.timeout)
        LoadAwarePolicy.begin(choice, len(prompt))
        t_dispatch = time.perf_counter()
        timings, n_out, last = Timings(plan=plan), 0, 0.0
        ended = False  # finished, or handed to the next worker: not an abort
        try:
            async for msg in f.call:
                now = time.perf_counter()
                if last == 0.0:
                    self._first(f, choice, timings, msg, t_dispatch, now)
                else:
                    self.metrics.itl.observe(now - last)
                last = now
                n_out += len(msg.token_ids)
                self.metrics.generation_tokens.inc(len(msg.token_ids))
                out = Delta(f.request_id, msg.token_ids, msg.text, msg.logprobs,
                            msg.finish_reason)
                if msg.finish_reason:
                    ended = True
                    self._last(f, out, timings, n_out, now)
                yield out
        except WorkerError as e:
            if e.code == "RESOURCE_EXHAUSTED" and last == 0.0:
                ended = True
                raise _Retry() from e
            if e.code == "CANCELLED" and f.aborted:
                yield Delta(f.request_id, [], "", finish_reason="abort",
                            prompt_tokens=f.prompt_len, completion_tokens=n_out)
                return
            raise GenerationError(e.code, f"decode worker {choice.decode.address}: "
                                  f"{e.details}") from e
        finally:
            LoadAwarePolicy.end(choice, len(prompt))
            f.call.cancel()
            if not ended:
                self.metrics.aborted.inc()
                log.info("request ended early", extra={"request_id": f.request_id})

    def _first(self, f: _Flight, choice: Choice, timings: Timings, msg: DecodeDelta,
               t_dispatch: float, now: float) -> None:
        LoadAwarePolicy.prefill_done(choice)
        self.metrics.queue.observe(t_dispatch - f.t0)
        self.metrics.ttft.observe(now - f.t0)
        self.metrics.prompt_tokens.inc(f.prompt_len)
        timings.ttft_s = now - f.t0
        timings.prefill_compute_s = msg.prefill_compute_s
        timings.kv_transfer_s, timings.kv_bytes = msg.kv_transfer_s, msg.kv_bytes

    def _last(self, f: _Flight, out: Delta, timings: Timings, n_out: int, now: float) -> None:
        timings.e2e_s = now - f.t0
        self.metrics.e2e.observe(timings.e2e_s)
        out.prompt_tokens, out.completion_tokens, out.timings = f.prompt_len, n_out, timings


class _Retry(Exception):
    """The decode worker was full before sending anything: try the next one."""
