"""The KV block allocator: which physical blocks of the pool each request owns, and
which hold a cached prefix.

Pure Python, no tensors. Every block is in exactly one state::

    EMPTY ──allocate──▶ IN USE (ref ≥ 1) ──free, last ref──▶ EMPTY         (no hash)
                          │    ▲                          └──▶ CACHED      (hash)
                       register│share / take_cached
                          ▼    │
                        IN USE with a hash ──free, last ref──▶ CACHED
    CACHED ──take_cached (a prefix hit)──▶ IN USE
    CACHED ──evict (allocate found no EMPTY block)──▶ IN USE, hash dropped

- EMPTY blocks are a stack: the most recently freed is reused first (warm in cache).
- CACHED blocks keep their KV and hash after their last request let go; they count
  as free and are evicted least recently freed first, only when no EMPTY block is
  left (vLLM's LRU, but empty blocks go before any cached one).
- A hash maps to one block; a second block computed with the same hash (two requests
  prefilled the same prefix at once) stays unregistered and is EMPTY when freed.
"""

from __future__ import annotations

from collections import OrderedDict

from pdserve.prefix_hash import BlockHash


class NoFreeBlocksError(RuntimeError):
    """Raised when an allocation asks for more blocks than are free."""


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool = True) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_caching = enable_caching
        self._ref_counts = [0] * num_blocks
        self._empty: list[int] = list(range(num_blocks - 1, -1, -1))
        self._cached_free: OrderedDict[int, None] = OrderedDict()  # LRU: evict from the front
        self._hash_of: list[BlockHash | None] = [None] * num_blocks
        self._block_of: dict[BlockHash, int] = {}

    @property
    def num_free_blocks(self) -> int:
        return len(self._empty) + len(self._cached_free)

    @property
    def num_cached_blocks(self) -> int:
        """Blocks holding a registered prefix, in use or not."""
        return len(self._block_of)

    @property
    def usage(self) -> float:
        """Share of the pool in use, 0..1 (``kv_cache_usage_perc``; cached free blocks
        count as free, as in vLLM)."""
        return 1.0 - self.num_free_blocks / self.num_blocks

    def blocks_for_tokens(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def can_allocate(self, num_blocks: int) -> bool:
        return num_blocks <= self.num_free_blocks

    def allocate(self, num_blocks: int) -> list[int]:
        if num_blocks > self.num_free_blocks:
            raise NoFreeBlocksError(f"asked for {num_blocks} blocks, "
                                    f"{self.num_free_blocks} free")
        out = [self._take_free() for _ in range(num_blocks)]
        for b in out:
            self._ref_counts[b] = 1
        return out

    def share(self, blocks: list[int]) -> None:
        for b in blocks:
            assert self._ref_counts[b] > 0, f"sharing free block {b}"
            self._ref_counts[b] += 1

    def free(self, blocks: list[int]) -> None:
        # Reversed: a request's last blocks (the least shared) are evicted first.
        for b in reversed(blocks):
            assert self._ref_counts[b] > 0, f"double free of block {b}"
            self._ref_counts[b] -= 1
            if self._ref_counts[b] == 0:
                self._release(b)

    def all_free(self) -> bool:
        return self.num_free_blocks == self.num_blocks and not any(self._ref_counts)

    # --- the prefix cache -------------------------------------------------------------
    def match_prefix(self, hashes: list[BlockHash]) -> list[int]:
        """The blocks holding the longest cached run of ``hashes`` from its start."""
        out: list[int] = []
        if not self.enable_caching:
            return out
        for h in hashes:
            b = self._block_of.get(h)
            if b is None:
                break
            out.append(b)
        return out

    def num_reclaimed(self, blocks: list[int]) -> int:
        """How many of ``blocks`` (a prefix hit) are CACHED, so taking them uses free blocks."""
        return sum(1 for b in blocks if self._ref_counts[b] == 0)

    def take_cached(self, blocks: list[int]) -> None:
        """A prefix hit: one more reference on each block, CACHED ones back in use."""
        for b in blocks:
            if self._ref_counts[b] == 0:
                del self._cached_free[b]
            self._ref_counts[b] += 1

    def register(self, block: int, block_hash: BlockHash) -> None:
        """``block`` (in use) now holds the full block ``block_hash`` names."""
        if not self.enable_caching or self._hash_of[block] is not None:
            return
        if block_hash not in self._block_of:
            self._block_of[block_hash] = block
            self._hash_of[block] = block_hash

    def cached_hashes(self) -> list[BlockHash]:
        return list(self._block_of)

    def reset_prefix_cache(self) -> None:
        """Forget every cached prefix (blocks in use keep their KV, unregistered)."""
        while self._cached_free:
            b, _ = self._cached_free.popitem(last=False)
            self._empty.append(b)
        self._hash_of = [None] * self.num_blocks
        self._block_of.clear()

    def _take_free(self) -> int:
        if self._empty:
            return self._empty.pop()
        b, _ = self._cached_free.popitem(last=False)  # evict the least recently freed
        h = self._hash_of[b]
        self._hash_of[b] = None
        del self._block_of[h]  # type: ignore[arg-type]  # every CACHED block has a hash
        return b

    def _release(self, b: int) -> None:
        if self._hash_of[b] is None:
            self._empty.append(b)
        else:
            self._cached_free[b] = None
