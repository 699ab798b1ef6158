"""The seam between the router and its decode workers, in domain types only.

``DecodeBackend.generate`` opens one generate call on a decode worker and hands
back a ``DecodeStream``: an async iterator of ``DecodeDelta`` that can be
cancelled from elsewhere (``Abort``). A call that ends with a status other than
OK raises ``WorkerError`` carrying the gRPC status name (RESOURCE_EXHAUSTED: the
worker has no room for the prompt; UNAVAILABLE: it is gone; CANCELLED after
``cancel``) and the role it blames: ``prefill`` when the decode worker says a
prefill worker failed the request (pdserve/worker_errors.py), else ``decode``.
``is_serving`` is the health probe, ``get_state`` the live load (any worker,
router/worker_loads.py). The real backend is gRPC (router/decode_client.py); tests
use a scripted fake (tests/router_fakes.py).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Protocol

from pdserve.logprobs import Logprob
from pdserve.sampling_params import SamplingParams
from pdserve.worker_state import WorkerLoad


@dataclass(frozen=True)
class DecodeJob:
    """What one generate call asks of a decode worker."""

    request_id: str  # the router's id, the one its client sees: logs of every role share it
    prompt: list[int]
    params: SamplingParams
    prefill_address: str | None = None  # None = plan LOCAL
    fallback_prefill: tuple[str, ...] = ()  # asked in order when prefill_address fails
    kv_encoding: int = 0
    timeout: float | None = None


@dataclass
class DecodeDelta:
    token_ids: list[int]
    text: str = ""
    logprobs: list[Logprob] = field(default_factory=list)
    finish_reason: str = ""
    # Set on the first delta: how the prompt's KV arrived.
    prefill_compute_s: float = 0.0
    kv_transfer_s: float = 0.0
    kv_bytes: int = 0
    num_cached_tokens: int = 0  # prompt tokens whose KV was not computed for it


class WorkerError(Exception):
    """A decode worker's call ended with a gRPC status other than OK."""

    def __init__(self, code: str, details: str, role: str = "decode") -> None:
        super().__init__(details)
        self.code, self.details, self.role = code, details, role


class DecodeStream(Protocol):
    def cancel(self) -> None:
        """End the call; the iteration then raises ``WorkerError("CANCELLED")``."""

    def __aiter__(self) -> AsyncIterator[DecodeDelta]: ...


class DecodeBackend(Protocol):
    def generate(self, address: str, job: DecodeJob) -> DecodeStream: ...

    async def is_serving(self, address: str, timeout: float) -> bool | None:
        """True/False: the worker answered SERVING or not; None: no answer in time."""

    async def get_state(self, address: str, timeout: float) -> WorkerLoad | None:
        """The worker's live state (any role); None: no answer, or not a sane one."""

    async def close(self) -> None: ...
