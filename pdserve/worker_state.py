"""What a worker tells the router about itself (``WorkerState.GetState``): its queue,
its free KV blocks, its measured rates and a summary of the prefixes it caches.

``WorkerLoad`` is the domain type on both sides (converted to and from protobuf in
pdserve/convert.py). A worker builds it with ``load_of`` on its serving thread while
the engine thread steps: every read is a single C-level copy or counter (``list`` of
a deque or a dict, ``len``), atomic under the GIL, so no step is waited for. The
prefix summary is the first 8 bytes of each cached block's hash: the router hashes a
prompt with the worker's salt (``prefix_hashes``) and counts the leading blocks found.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from pdserve.prefix_hash import BlockHash, prefix_hashes

if TYPE_CHECKING:
    from pdserve.engine.engine import LLMEngine


@dataclass(frozen=True)
class WorkerLoad:
    role: str
    num_running: int
    num_waiting: int
    pending_prefill_tokens: int
    """Prompt tokens admitted or waiting and not yet computed: the prefill queue."""
    num_free_blocks: int
    num_blocks: int
    block_size: int
    prefill_tokens_per_s: float = 0.0
    """Measured (moving average); 0 = not measured yet."""
    decode_step_s: float = 0.0
    kv_link_bytes_per_s: float = 0.0
    """Decode workers: KV bytes their link carried per second of transfer, over recent
    transfers, overlapping ones together (decode_worker/link_rate.py)."""
    prefix_salt: bytes = b""
    cached_blocks: frozenset[int] = field(default_factory=frozenset)
    seq: int = 0
    """Engine steps so far."""
    decode_step_budget_s: float = 0.0
    """While requests decode, prefill chunks are cut to steps of this long (0: not)."""
    kv_bytes_per_token: float = 0.0
    """KV bytes one prompt token puts on the wire in this worker's default encoding."""
    kv_bytes_per_token_by_encoding: Mapping[int, float] = field(default_factory=dict)
    """The same per wire encoding (``KVEncoding`` value) it can receive."""
    kv_pending_bytes: int = 0
    """Decode workers: KV bytes of their imports still to arrive (the link's backlog)."""

    def cached_tokens(self, hashes: Sequence[BlockHash]) -> int:
        """Leading tokens of a prompt with these block ``hashes`` (made with this
        worker's salt and block size) that this worker holds."""
        n = 0
        for h in hashes:
            if short_hash(h) not in self.cached_blocks:
                break
            n += 1
        return n * self.block_size

    def prompt_hashes(self, tokens: Sequence[int]) -> list[BlockHash]:
        """The block hashes of ``tokens`` as this worker computes them (all but the last
        token, which a worker always computes)."""
        if not self.prefix_salt or not self.cached_blocks:
            return []
        return prefix_hashes(list(tokens[:-1]), self.block_size, self.prefix_salt)


def short_hash(h: BlockHash) -> int:
    return int.from_bytes(h[:8], "little")


@dataclass(frozen=True)
class LinkState:
    """What a worker's servicer knows of its KV link, beside the engine's state."""

    bytes_per_s: float = 0.0
    pending_bytes: int = 0
    bytes_per_token: float = 0.0
    bytes_per_token_by_encoding: Mapping[int, float] = field(default_factory=dict)


def load_of(engine: LLMEngine, role: str, link: LinkState,
            prefix_summary: bool = True) -> WorkerLoad:
    s, b, m = engine.scheduler, engine.blocks, engine.meter
    waiting, running = list(s.waiting), list(s.running)
    missing = [r.num_tokens - r.num_computed_tokens for r in running]
    pending = sum(r.num_tokens - r.num_computed_tokens for r in waiting)
    pending += sum(m for m in missing if m > 1)  # 1 missing: a decode, not a prefill
    cached = frozenset(short_hash(h) for h in b.cached_hashes()) if prefix_summary else None
    return WorkerLoad(role, len(running), len(waiting), pending, b.num_free_blocks,
                      b.num_blocks, b.block_size, m.prefill_tokens_per_s, m.decode_step_s,
                      link.bytes_per_s, engine.local_salt if b.enable_caching else b"",
                      cached or frozenset(), m.steps, engine.config.decode_step_budget_s,
                      link.bytes_per_token, link.bytes_per_token_by_encoding,
                      link.pending_bytes)
