"""Fakes of the router's seams, for unit tests without a model or a socket.

``FakeDecodeBackend`` is a ``DecodeBackend`` over scripted ``FakeDecodeWorker``s:
each streams ``max_tokens`` one-token deltas (the last with finish reason
"length") unless told to answer RESOURCE_EXHAUSTED first, fail mid-stream, hold
the stream open until released or cancelled, or answer its health probe
NOT_SERVING / not at all. The token at sequence position n (prompt included) is
``80 + n``, a pure function of the position as greedy decoding is of the sequence,
so a request moved to another worker with its tokens so far continues where it
stopped (a 20-token prompt gives 100, 101, ...). ``RecordingPolicy`` is a ``RoutingPolicy`` that takes
the first decode worker not excluded and writes down what the router tells it.
``FakeTokenizer`` is one token per character.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence, Set
from dataclasses import dataclass, field

from pdserve.config import RouterConfig
from pdserve.metrics import RouterMetrics
from pdserve.worker_state import WorkerLoad
from router.decode_backend import DecodeDelta, DecodeJob, WorkerError
from router.generation import Generator
from router.health import DecodeHealth
from router.policy import Choice, LoadAwarePolicy, Member, RoutingPolicy

VOCAB = 1000


class FakeTokenizer:
    vocab_size = VOCAB

    def encode(self, text: str) -> list[int]:
        return [ord(c) % VOCAB for c in text]

    def token_text(self, token_id: int) -> str:
        return f"<{token_id}>"

    def decode(self, token_ids: list[int], skip_special_tokens: bool) -> str:
        return "".join(f" t{t}" for t in token_ids)  # what FakeDecodeWorker streams

    def apply_chat_template(self, messages: list[dict[str, str]]) -> list[int]:
        return self.encode("".join(f"{m['role']}: {m['content']}\n" for m in messages))


@dataclass
class FakeDecodeWorker:
    address: str
    serving: bool | None = True
    """Health answer: SERVING, NOT_SERVING, or None for no answer in time."""
    full_calls: int = 0
    """This many next calls answer RESOURCE_EXHAUSTED before any token."""
    fail_after: int | None = None
    """After this many deltas the call fails with ``fail_code``."""
    fail_code: str = "INTERNAL"
    fail_role: str = "decode"
    """The role the failure blames (``prefill``: the decode worker says a prefill
    worker failed the request)."""
    hold_after: int | None = None
    """After this many deltas the stream waits for ``release`` (or a cancel)."""
    state: WorkerLoad | None = None
    """What ``get_state`` answers (None: no live state)."""
    cached_tokens: int = 0
    """The prompt tokens its first delta says were not computed (a prefix cache hit)."""
    jobs: list[DecodeJob] = field(default_factory=list)
    streams: list[FakeDecodeStream] = field(default_factory=list)
    holding: asyncio.Event = field(default_factory=asyncio.Event)
    """Set while one of its streams waits on ``hold_after``."""

    def release(self) -> None:
        self.hold_after = None
        for s in self.streams:
            s.wake.set()

    @property
    def open_streams(self) -> int:
        return sum(s.open for s in self.streams)


class FakeDecodeStream:
    def __init__(self, worker: FakeDecodeWorker, job: DecodeJob) -> None:
        self.worker, self.job = worker, job
        self.full = worker.full_calls > 0
        worker.full_calls -= self.full
        self.cancelled = False
        self.open = True
        self.sent = 0
        self.wake = asyncio.Event()

    def cancel(self) -> None:
        self.cancelled = True
        self.wake.set()

    def _check_cancelled(self) -> None:
        if self.cancelled:
            raise WorkerError("CANCELLED", "cancelled by the router")

    async def _hold(self) -> None:
        while self.worker.hold_after == self.sent and not self.cancelled:
            self.worker.holding.set()
            await self.wake.wait()
            self.wake.clear()
        self.worker.holding.clear()

    async def __aiter__(self) -> AsyncIterator[DecodeDelta]:
        try:
            if self.full:
                raise WorkerError("RESOURCE_EXHAUSTED", "no KV blocks for the prompt")
            n = self.job.params.max_tokens
            for i in range(n):
                await self._hold()
                self._check_cancelled()
                if self.worker.fail_after == self.sent:
                    raise WorkerError(self.worker.fail_code, "the decode worker broke",
                                      self.worker.fail_role)
                self.sent += 1
                token = 80 + len(self.job.prompt) + i
                yield DecodeDelta([token], f" t{token}", finish_reason="length" if i == n - 1
                                  else "", kv_bytes=64 if i == 0 else 0,
                                  num_cached_tokens=self.worker.cached_tokens if i == 0 else 0)
        finally:
            self.open = False


class FakeDecodeBackend:
    def __init__(self, workers: Sequence[FakeDecodeWorker]) -> None:
        self.workers = {w.address: w for w in workers}
        self.closed = False

    def generate(self, address: str, job: DecodeJob) -> FakeDecodeStream:
        worker = self.workers[address]
        worker.jobs.append(job)
        stream = FakeDecodeStream(worker, job)
        worker.streams.append(stream)
        return stream

    async def is_serving(self, address: str, timeout: float) -> bool | None:
        return self.workers[address].serving

    async def get_state(self, address: str, timeout: float) -> WorkerLoad | None:
        w = self.workers.get(address)
        return None if w is None or not w.serving else w.state

    async def close(self) -> None:
        self.closed = True

    @property
    def open_streams(self) -> int:
        return sum(w.open_streams for w in self.workers.values())


class RecordingPolicy:
    """The first decode worker not excluded; REMOTE on the first prefill worker not
    excluded, if any, the others its fallbacks."""

    def __init__(self, decode: Sequence[str], prefill: Sequence[str] = ()) -> None:
        self.decode, self.prefill = list(decode), list(prefill)
        self.events: list[tuple[str, str]] = []
        self.kv_encoding = 0  # what each Choice asks the prefill worker for

    def choose(self, tokens: Sequence[int], exclude: Set[str] = frozenset()) -> Choice | None:
        left = [a for a in self.decode if a not in exclude]
        if not left:
            return None
        prefill = [a for a in self.prefill if a not in exclude]
        return Choice(Member(left[0]), Member(prefill[0]) if prefill else None,
                      tuple(prefill[1:]), kv_encoding=self.kv_encoding)

    def dispatched(self, request_id: str, choice: Choice, num_prompt_tokens: int) -> None:
        self.events.append(("dispatched", choice.decode.address))

    def prefill_finished(self, request_id: str, ttft_s: float | None = None) -> None:
        self.events.append(("prefill_finished", request_id))

    def ended(self, request_id: str) -> None:
        self.events.append(("ended", request_id))

    def set_members(self, decode: Sequence[str], prefill: Sequence[str]) -> None:
        self.decode, self.prefill = list(decode), list(prefill)


def load_aware(decode: Sequence[str], prefill: Sequence[str] = (),
               local_prefill_below: int = RouterConfig.local_prefill_below) -> LoadAwarePolicy:
    return LoadAwarePolicy(decode, prefill, local_prefill_below)


def nothing_in_flight(policy: LoadAwarePolicy) -> bool:
    """Every in-flight count of every member is back to zero."""
    return policy.in_flight == 0 and all(
        m.in_flight_tokens == 0 and m.in_flight_requests == 0
        for m in [*policy.decode, *policy.prefill])


def make_generator(backend: FakeDecodeBackend, policy: RoutingPolicy,
                   health: DecodeHealth | None = None, max_model_len: int = 64) -> Generator:
    return Generator("fake-model", FakeTokenizer(), policy, max_model_len, backend,
                     RouterMetrics("fake-model"), health)
