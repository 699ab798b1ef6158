"""One generation stream, shared by the gRPC ``Generation`` service and the
OpenAI-compatible HTTP API (both convert their wire format to these types at one
point; nothing here knows protobuf or JSON). Seams: a ``RoutingPolicy``
(router/policy.py) picks the decode worker and plan, a ``DecodeBackend``
(router/decode_backend.py) carries the call.

Per request (``Stage``; the router holds it as a ``_Flight`` from ROUTING on)::

    RECEIVED ─_receive─▶ ROUTING ─_dispatch─▶ DISPATCHED ─_first_token─▶ STREAMING ─_finish─▶ DONE
                                                         ─_resumed─────▶ (after a migration)

    ROUTING                ─_route────▶ FAILED     no decode worker left to try (a migrating
                                                   request first waits up to 10 s for one)
    DISPATCHED             ─_retry────▶ ROUTING    the worker was full (RESOURCE_EXHAUSTED)
    DISPATCHED, STREAMING  ─_migrate──▶ ROUTING    the decode worker died (UNAVAILABLE)
    DISPATCHED, STREAMING  ─_aborted──▶ ABORTED    ``abort``: the call was cancelled
    DISPATCHED, STREAMING  ─_fail─────▶ FAILED     the call failed (or the deadline passed)
    DISPATCHED, STREAMING  ─_hang_up──▶ CANCELLED  the stream closed first (client gone)

``_receive`` admits, checks the prompt's size, tokenizes (in a thread: the event loop
keeps serving) and validates (else ``GenerationError``:
INVALID_ARGUMENT naming the ``param``, UNAVAILABLE while draining or with no
decode worker up, ALREADY_EXISTS) and sets the request's deadline: the client's,
at most ``request_timeout_s`` (HTTP brings none). ``_route`` asks the policy for a
decode worker neither down nor tried yet (and plans REMOTE only on prefill
workers up); none left is RESOURCE_EXHAUSTED when every one answered full, the
failure that sent the request back to ROUTING if one did, else UNAVAILABLE.
DISPATCHED and STREAMING hold one call on a decode worker, whose deadline is what
is left of the request's; ``_hang_up`` ends that call whatever ended it and tells
the policy. Past the deadline the call ends with DEADLINE_EXCEEDED (HTTP 504).

Errors name the role that failed: a decode worker's own RESOURCE_EXHAUSTED is
"full" (retried on the next one); a failure it blames on a prefill worker
(``WorkerError.role``) is reported as the prefill's, never retried as "full" and
never migrated.

Migration (router/migration.py, on by default): a call that fails because its
decode worker died goes back to ROUTING and is resubmitted elsewhere with the
tokens streamed so far; the client sees one stream.

Closing the stream (client gone), ``abort`` and the deadline all cancel the
decode worker's call, which cancels the prefill call. The request id is bound to
every log line of the request (``pdserve.logs.request_scope``) and is the one the
decode worker gets, so one ``grep`` follows a request through every role.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import logging
import time
import uuid
from collections.abc import AsyncGenerator, Iterator
from dataclasses import dataclass, field

from pdserve.config import RouterConfig
from pdserve.logs import request_scope
from pdserve.metrics import RouterMetrics
from router.decode_backend import DecodeBackend, DecodeDelta, DecodeJob, DecodeStream, WorkerError
from router.health import DecodeHealth
from router.migration import MIGRATION_WAIT_S, RETRY_TRIED_AFTER_S, can_migrate, next_call, nothing_left
from router.policy import Choice, RoutingPolicy
from router.request import Delta, GenerateRequest, GenerationError, Timings, validate_request
from router.tokenizer import PromptTokenizer

log = logging.getLogger(__name__)


class Stage(enum.Enum):
    ROUTING = "routing"
    DISPATCHED = "dispatched"
    STREAMING = "streaming"
    DONE = "done"
    ABORTED = "aborted"
    FAILED = "failed"
    CANCELLED = "cancelled"


_ON_WORKER = (Stage.DISPATCHED, Stage.STREAMING)


@dataclass
class _Flight:
    """One request from ROUTING to its end."""

    request_id: str
    request: GenerateRequest
    prompt: list[int]
    t0: float
    timeout_s: float  # the request's deadline is t0 + timeout_s
    stage: Stage = Stage.ROUTING
    tried: set[str] = field(default_factory=set)
    full: set[str] = field(default_factory=set)  # decode workers that answered full
    decode_address: str = ""  # the decode worker of the latest call
    call: DecodeStream | None = None  # set while on a decode worker
    aborted: bool = False
    t_dispatch: float = 0.0
    t_last: float = 0.0
    output: list[int] = field(default_factory=list)  # token ids streamed so far
    text: str = ""  # text streamed so far
    migrations: int = 0
    failure: GenerationError | None = None  # what sent it back to ROUTING, if it failed
    deadline_timer: asyncio.TimerHandle | None = None  # cancels the call at the deadline
    expired: bool = False
    finish_reason: str = ""
    timings: Timings = field(default_factory=Timings)
    cached_tokens: int = 0  # of the prompt, as the first decode call reported

    @property
    def completion_tokens(self) -> int:
        return len(self.output)

    @property
    def deadline(self) -> float:
        return self.t0 + self.timeout_s

    def time_left(self) -> float:
        return self.deadline - time.perf_counter()


@contextlib.contextmanager
def _bound_request_id(rid: str) -> Iterator[None]:
    """``request_scope`` around a stream. A stream dropped unclosed is closed by the
    event loop's finalizer in a task of its own, where the id was never bound:
    there is nothing to unbind there."""
    scope = request_scope(rid)
    scope.__enter__()
    try:
        yield
    finally:
        with contextlib.suppress(ValueError):
            scope.__exit__(None, None, None)


class Generator:
    def __init__(self, model_id: str, tokenizer: PromptTokenizer, policy: RoutingPolicy,
                 max_model_len: int, decode: DecodeBackend, metrics: RouterMetrics,
                 health: DecodeHealth | None = None, *,
                 prefill_health: DecodeHealth | None = None,
                 request_timeout_s: float = RouterConfig.request_timeout_s,
                 migration_limit: int = RouterConfig.migration_limit,
                 max_prompt_chars: int | None = None) -> None:
        """``migration_limit`` 0 turns migration off (``RouterConfig.migration``)."""
        self.model_id = model_id
        self.max_prompt_chars = max_prompt_chars  # None: derived from max_model_len
        self.tokenizer = tokenizer
        self.policy = policy
        self.max_model_len = max_model_len
        self.decode = decode
        self.metrics = metrics
        self.health = health
        self.prefill_health = prefill_health
        self.request_timeout_s = request_timeout_s
        self.migration_limit = migration_limit
        self.draining = False
        self._flights: dict[str, _Flight] = {}
        metrics.watch(lambda: self.running - self.waiting, lambda: self.waiting)

    @property
    def running(self) -> int:
        """Every request the router holds, dispatched or not."""
        return len(self._flights)

    @property
    def waiting(self) -> int:
        """Requests not yet dispatched to a decode worker."""
        return sum(f.stage is Stage.ROUTING for f in self._flights.values())

    def stage(self, request_id: str) -> Stage | None:
        f = self._flights.get(request_id)
        return None if f is None else f.stage

    def abort(self, request_id: str) -> bool:
        f = self._flights.get(request_id)
        if f is None or f.call is None:
            return False
        f.aborted = True
        f.call.cancel()
        return True

    async def generate(self, req: GenerateRequest) -> AsyncGenerator[Delta]:
        t0 = time.perf_counter()
        rid = req.request_id or f"req-{uuid.uuid4().hex[:16]}"
        with _bound_request_id(rid):
            f = await self._receive(rid, req, t0)
            try:
                while f.stage is Stage.ROUTING:
                    stream = self._dispatch(f, await self._route_or_wait(f))
                    try:
                        async for msg in stream:
                            yield self._relay(f, msg)
                    except WorkerError as e:
                        if (last := self._worker_failed(f, e)) is not None:
                            yield last
                    finally:
                        self._hang_up(f)
            finally:
                self._end(f)

    # RECEIVED → ROUTING

    async def _receive(self, rid: str, req: GenerateRequest, t0: float) -> _Flight:
        """Admitted, tokenized and validated, else ``GenerationError``."""
        self._admissible(rid)
        # Tokenizing a long prompt takes seconds of CPU: in a thread, so /health and
        # every other request keep being served meanwhile.
        prompt, params = await asyncio.to_thread(
            validate_request, req, self.model_id, self.tokenizer, self.max_model_len,
            self.max_prompt_chars)
        self._admissible(rid)  # again: the world moved while the thread tokenized
        timeout_s = min(req.timeout or self.request_timeout_s, self.request_timeout_s)
        f = _Flight(rid, dataclasses.replace(req, params=params), prompt, t0, timeout_s)
        self._flights[rid] = f
        return f

    def _admissible(self, rid: str) -> None:
        if self.draining:
            raise GenerationError("UNAVAILABLE", "the router is draining; retry elsewhere")
        if self.health is not None and not self.health.usable:
            raise GenerationError("UNAVAILABLE", "no decode worker is reachable")
        if rid in self._flights:
            raise GenerationError("ALREADY_EXISTS", f"request_id {rid!r} is in use", "request_id")

    # ROUTING → DISPATCHED (or FAILED)

    async def _route_or_wait(self, f: _Flight) -> Choice:
        """``_route``; a migrating request that finds no decode worker up waits (at most
        ``MIGRATION_WAIT_S`` of its deadline) for a restarted one to be seen serving.
        After ``RETRY_TRIED_AFTER_S`` (two health probes: a dead worker is DOWN by then)
        the workers it already tried count again: one that died and came back is as
        good as any, and health keeps out those still down."""
        t0 = time.perf_counter()
        give_up = t0 + min(MIGRATION_WAIT_S, f.time_left())
        while True:
            try:
                return self._route(f)
            except GenerationError:
                if not f.migrations or f.aborted or time.perf_counter() >= give_up:
                    raise
            f.stage = Stage.ROUTING
            if time.perf_counter() - t0 >= RETRY_TRIED_AFTER_S:
                f.tried &= f.full
            await asyncio.sleep(0.2)

    def _route(self, f: _Flight) -> Choice:
        down = self.health.down() if self.health is not None else set()
        if self.prefill_health is not None:
            down |= self.prefill_health.down()
        choice = self.policy.choose(f.prompt + f.output, f.tried | down)
        if choice is None:
            f.stage = Stage.FAILED
            if f.failure is not None:
                raise f.failure
            raise GenerationError("RESOURCE_EXHAUSTED" if f.full else "UNAVAILABLE",
                                  "every decode worker is full; retry later" if f.full
                                  else "no decode worker is reachable")
        return choice

    def _dispatch(self, f: _Flight, choice: Choice) -> DecodeStream:
        prefill = choice.prefill.address if choice.prefill is not None else None
        prompt, params = next_call(f.prompt, f.output, f.request.params)
        encoding = f.request.kv_encoding or choice.kv_encoding  # a client's choice wins
        job = DecodeJob(f.request_id, prompt, params, prefill_address=prefill,
                        fallback_prefill=choice.prefill_fallbacks, kv_encoding=encoding,
                        timeout=max(f.time_left(), 0.001))
        f.call = self.decode.generate(choice.decode.address, job)
        # The router's own deadline too: a worker may not honour the call's.
        f.deadline_timer = asyncio.get_running_loop().call_later(
            max(f.time_left(), 0.0), self._expire, f)
        self.policy.dispatched(f.request_id, choice, len(prompt))
        f.tried.add(choice.decode.address)
        f.stage, f.decode_address = Stage.DISPATCHED, choice.decode.address
        f.t_dispatch = time.perf_counter()
        f.timings = Timings(plan=choice.plan, predicted_ttft_s=choice.predicted_ttft_s or 0.0)
        log.info("request routed", extra={
            "decode": choice.decode.address, "plan": choice.plan, "prefill": prefill,
            "kv_encoding": encoding, "prompt_tokens": len(prompt), "migrations": f.migrations})
        return f.call

    # DISPATCHED → STREAMING → DONE

    def _relay(self, f: _Flight, msg: DecodeDelta) -> Delta:
        now = time.perf_counter()
        if f.stage is Stage.DISPATCHED and f.output:
            self._resumed(f)
            self.metrics.itl.observe(now - f.t_last)
        elif f.stage is Stage.DISPATCHED:
            self._first_token(f, msg, now)
        else:
            self.metrics.itl.observe(now - f.t_last)
        f.t_last = now
        f.output += msg.token_ids
        text = msg.text if not f.migrations else self._migrated_text(f, msg)
        f.text += text
        self.metrics.generation_tokens.inc(len(msg.token_ids))
        out = Delta(f.request_id, msg.token_ids, text, msg.logprobs, msg.finish_reason)
        if msg.finish_reason:
            self._finish(f, out, now)
        return out

    def _migrated_text(self, f: _Flight, msg: DecodeDelta) -> str:
        """After a migration the new worker's detokenizer starts at the moved tokens, so
        a character split across the move would come out garbled: the router decodes
        the whole output instead (held back while it ends in an incomplete character).
        A stop string cut the worker's text: that text stands."""
        if msg.finish_reason == "stop" and f.request.params.stop:
            return msg.text
        full = self.tokenizer.decode(f.output, f.request.params.skip_special_tokens)
        if full.endswith("\ufffd"):  # held back, even at the end, as the worker does
            return ""
        return full[len(f.text):]

    def _first_token(self, f: _Flight, msg: DecodeDelta, now: float) -> None:
        f.stage = Stage.STREAMING
        self.policy.prefill_finished(f.request_id, now - f.t_dispatch)
        self.metrics.queue.observe(f.t_dispatch - f.t0)
        self.metrics.ttft.observe(now - f.t0)
        self.metrics.prompt_tokens.inc(len(f.prompt))
        f.timings.ttft_s = now - f.t0
        f.timings.prefill_compute_s = msg.prefill_compute_s
        f.timings.kv_transfer_s, f.timings.kv_bytes = msg.kv_transfer_s, msg.kv_bytes
        f.cached_tokens = min(msg.num_cached_tokens, len(f.prompt))  # a worker's claim
        if f.timings.predicted_ttft_s:
            log.info("routed", extra={"plan": f.timings.plan, "decode": f.decode_address,
                                      "predicted_ttft_s": round(f.timings.predicted_ttft_s, 4),
                                      "actual_ttft_s": round(now - f.t_dispatch, 4)})

    def _resumed(self, f: _Flight) -> None:
        """The first token of a migrated request's new call: the stream goes on."""
        f.stage = Stage.STREAMING
        self.policy.prefill_finished(f.request_id)
        log.info("migrated request resumed", extra={
            "decode": f.decode_address, "completion_tokens": len(f.output)})

    def _finish(self, f: _Flight, out: Delta, now: float) -> None:
        f.stage, f.finish_reason = Stage.DONE, out.finish_reason
        f.timings.e2e_s = now - f.t0
        self.metrics.e2e.observe(f.timings.e2e_s)
        out.prompt_tokens, out.completion_tokens = len(f.prompt), f.completion_tokens
        out.cached_tokens, out.timings = f.cached_tokens, f.timings

    # DISPATCHED/STREAMING → ROUTING, ABORTED or FAILED

    def _worker_failed(self, f: _Flight, e: WorkerError) -> Delta | None:
        """The call ended with an error: retry, migrate, the abort's last delta, or raise."""
        if f.expired:
            e = WorkerError("DEADLINE_EXCEEDED", "the request's deadline passed")
        if e.code == "RESOURCE_EXHAUSTED" and e.role == "decode" and f.stage is Stage.DISPATCHED:
            self._retry(f)
            return None
        if e.code == "CANCELLED" and f.aborted:
            return self._aborted(f)
        if can_migrate(e, f.aborted, f.migrations, self.migration_limit):
            return self._migrate(f, e)
        raise self._fail(f, e) from e

    def _retry(self, f: _Flight) -> None:
        """The decode worker was full before sending anything: try the next one."""
        f.full.add(f.decode_address)
        f.stage = Stage.ROUTING

    def _migrate(self, f: _Flight, e: WorkerError) -> Delta | None:
        """The decode worker died: back to ROUTING, to be resubmitted with what was
        streamed so far (``next_call``); with no token left to make, DONE here."""
        f.migrations += 1
        self.metrics.migrations.inc()
        f.failure = GenerationError(e.code, f"decode worker {f.decode_address}: {e.details}")
        log.warning("decode worker failed mid-request, migrating", extra={
            "decode": f.decode_address, "code": e.code, "error": e.details,
            "completion_tokens": len(f.output), "migration": f.migrations})
        f.stage = Stage.ROUTING
        if not nothing_left(f.prompt, f.output, f.request.params, self.max_model_len):
            return None
        out = Delta(f.request_id, [], "", finish_reason="length")
        self._finish(f, out, time.perf_counter())
        return out

    def _aborted(self, f: _Flight) -> Delta:
        f.stage, f.finish_reason = Stage.ABORTED, "abort"
        return Delta(f.request_id, [], "", finish_reason="abort", prompt_tokens=len(f.prompt),
                     completion_tokens=f.completion_tokens, cached_tokens=f.cached_tokens)

    def _fail(self, f: _Flight, e: WorkerError) -> GenerationError:
        f.stage = Stage.FAILED
        if e.code == "DEADLINE_EXCEEDED":  # the only deadline the call has is the request's
            return GenerationError("DEADLINE_EXCEEDED", f"the request did not finish within "
                                   f"its deadline of {f.timeout_s:g} s")
        if e.role == "prefill":
            return GenerationError(e.code, f"prefill failed (reported by decode worker "
                                   f"{f.decode_address}): {e.details}")
        return GenerationError(e.code, f"decode worker {f.decode_address}: {e.details}")

    # the end of each call, and of the request

    def _expire(self, f: _Flight) -> None:
        """The request's deadline passed while a call was open: end the call."""
        f.expired = True
        if f.call is not None:
            f.call.cancel()

    def _hang_up(self, f: _Flight) -> None:
        """One call on a decode worker is over, whatever ended it."""
        self.policy.ended(f.request_id)
        if f.deadline_timer is not None:
            f.deadline_timer.cancel()
            f.deadline_timer = None
        if f.call is not None:
            f.call.cancel()  # a no-op on a finished call
            f.call = None
        if f.stage in _ON_WORKER:  # no finish reason: the client went away or the stream stopped
            f.stage = Stage.CANCELLED
        if f.stage not in (Stage.DONE, Stage.ROUTING):
            self.metrics.aborted.inc()

    def _end(self, f: _Flight) -> None:
        del self._flights[f.request_id]
        log.info("request ended", extra={
            "stage": f.stage.value, "finish_reason": f.finish_reason,
            "prompt_tokens": len(f.prompt), "completion_tokens": f.completion_tokens,
            "migrations": f.migrations,
            "ttft_s": round(f.timings.ttft_s, 6), "e2e_s": round(time.perf_counter() - f.t0, 6)})

