from __future__ import annotations

import pytest

from pdserve.engine.block_manager import BlockManager, NoFreeBlocksError


def test_allocate_share_free_cycle() -> None:
    bm = BlockManager(num_blocks=4, block_size=16)
    assert bm.blocks_for_tokens(1) == 1 and bm.blocks_for_tokens(17) == 2
    a = bm.allocate(3)
    assert len(set(a)) == 3 and bm.num_free_blocks == 1 and bm.usage == 0.75
    bm.share(a[:1])  # a prefix shared with a second request
    bm.free(a)
    assert bm.num_free_blocks == 3  # the shared block is still referenced
    bm.free(a[:1])
    assert bm.all_free()


def test_over_allocation_and_double_free_are_refused() -> None:
    bm = BlockManager(num_blocks=2, block_size=16)
    with pytest.raises(NoFreeBlocksError):
        bm.allocate(3)
    b = bm.allocate(1)
    bm.free(b)
    with pytest.raises(AssertionError):
        bm.free(b)
    assert bm.all_free()
