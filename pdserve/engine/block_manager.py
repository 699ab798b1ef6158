"""The KV block allocator: which physical blocks of the pool each request owns.

Pure Python, no tensors. Blocks carry reference counts so a block can be shared
(prefix caching); a block returns to the free list when its count drops to 0.
"""

from __future__ import annotations


class NoFreeBlocksError(RuntimeError):
    """Raised when an allocation asks for more blocks than are free."""


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._ref_counts = [0] * num_blocks
        # A stack: recently freed blocks are reused first (warm in cache).
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def usage(self) -> float:
        """Share of the pool in use, 0..1 (``kv_cache_usage_perc``)."""
        return 1.0 - len(self._free) / self.num_blocks

    def blocks_for_tokens(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def can_allocate(self, num_blocks: int) -> bool:
        return num_blocks <= len(self._free)

    def allocate(self, num_blocks: int) -> list[int]:
        if num_blocks > len(self._free):
            raise NoFreeBlocksError(f"asked for {num_blocks} blocks, {len(self._free)} free")
        out = [self._free.pop() for _ in range(num_blocks)]
        for b in out:
            self._ref_counts[b] = 1
        return out

    def share(self, blocks: list[int]) -> None:
        for b in blocks:
            assert self._ref_counts[b] > 0, f"sharing free block {b}"
            self._ref_counts[b] += 1

    def free(self, blocks: list[int]) -> None:
        for b in reversed(blocks):
            assert self._ref_counts[b] > 0, f"double free of block {b}"
            self._ref_counts[b] -= 1
            if self._ref_counts[b] == 0:
                self._free.append(b)

    def all_free(self) -> bool:
        return len(self._free) == self.num_blocks
