"""A request inside the engine and its lifecycle.

States (each request is in exactly one)::

    WAITING ──schedule──▶ RUNNING ──finish──▶ FINISHED
       ▲                     │
       └──────preempt────────┘   (blocks freed; KV recomputed later)

    IMPORTING ──commit──▶ RUNNING      (KV arrived from another engine)
    IMPORTING ──abandon──▶ WAITING     (the sender died: prefill here instead)
    any state ──abort──▶ FINISHED      (finish_reason "abort")

IMPORTING is the engine's side of a ``KVImport`` (pdserve/engine/kv_import.py) while
it is RESERVED or RECEIVING; commit is its COMMITTED, abandon its FELL_BACK, abort
its ABORTED.

Token accounting follows vLLM v1: there is no prefill or decode phase. A request
holds ``all_token_ids`` (prompt + output) and ``num_computed_tokens``; each step
the scheduler gives it some of the missing tokens. When everything known is
computed, the step's logits sample the next token.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Any

from pdserve.logprobs import Logprob
from pdserve.prefix_hash import BlockHash
from pdserve.sampling_params import SamplingParams


class RequestState(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    IMPORTING = "importing"
    FINISHED = "finished"


@dataclass
class RequestMetrics:
    arrival_time: float = field(default_factory=time.perf_counter)
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finished_time: float | None = None
    num_preemptions: int = 0


class Request:
    def __init__(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams):
        self.request_id = request_id
        self.prompt_token_ids = list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.all_token_ids: list[int] = list(prompt_token_ids)
        self.params = params
        self.state = RequestState.WAITING
        self.num_computed_tokens = 0
        self.block_ids: list[int] = []
        # Prefix caching: the hash of each full block of all_token_ids (a chain from
        # hash_salt), how many of block_ids are registered in the cache, and how many
        # leading tokens the last admission found cached.
        self.hash_salt: BlockHash = b""
        self.block_hashes: list[BlockHash] = []
        self.num_registered_blocks = 0
        self.num_cached_tokens = 0
        self.finish_reason: str | None = None
        self.stop_reason: str | int | None = None
        self.logprobs: list[Logprob] = []
        self.metrics = RequestMetrics()
        # Output text so far and how much of it the caller has seen.
        self.text = ""
        self.num_sent_tokens = 0
        self.num_sent_chars = 0
        self.kv_exporter: Any = None  # an engine.KVExporter while its prompt is computed

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.all_token_ids[self.num_prompt_tokens :]

    @property
    def num_output_tokens(self) -> int:
        return len(self.all_token_ids) - self.num_prompt_tokens

    @property
    def is_finished(self) -> bool:
        return self.state is RequestState.FINISHED

    # --- transitions -------------------------------------------------------------
    def start_running(self) -> None:
        assert self.state is RequestState.WAITING, self.state
        self.state = RequestState.RUNNING
        if self.metrics.first_scheduled_time is None:
            self.metrics.first_scheduled_time = time.perf_counter()

    def preempt(self) -> list[int]:
        """Back to WAITING; returns the blocks to free. KV will be recomputed."""
        assert self.state is RequestState.RUNNING, self.state
        self.state = RequestState.WAITING
        self.num_computed_tokens = 0
        self.metrics.num_preemptions += 1
        return self._release_blocks()

    def commit_import(self, first_token_id: int) -> None:
        """IMPORTING → RUNNING: the prompt's KV is in our blocks, the first token known."""
        assert self.state is RequestState.IMPORTING, self.state
        self.num_computed_tokens = self.num_prompt_tokens
        self.state = RequestState.RUNNING
        self.metrics.first_scheduled_time = time.perf_counter()

    def abandon_import(self) -> list[int]:
        """IMPORTING → WAITING; returns the reserved blocks to free (what arrived of the
        KV is dropped: the prompt is prefilled here from scratch)."""
        assert self.state is RequestState.IMPORTING, self.state
        self.state = RequestState.WAITING
        self.num_cached_tokens = 0
        return self._release_blocks()

    def append_token(self, token_id: int, logprob: Logprob | None) -> None:
        self.all_token_ids.append(token_id)
        if logprob is not None:
            self.logprobs.append(logprob)
        if self.metrics.first_token_time is None:
            self.metrics.first_token_time = time.perf_counter()

    def finish(self, reason: str, stop_reason: str | int | None = None) -> list[int]:
        """Any state → FINISHED; returns the blocks to free."""
        self.state = RequestState.FINISHED
        self.finish_reason = reason
        self.stop_reason = stop_reason
        self.metrics.finished_time = time.perf_counter()
        return self._release_blocks()

    def _release_blocks(self) -> list[int]:
        blocks, self.block_ids = self.block_ids, []
        self.num_registered_blocks = 0
        return blocks
