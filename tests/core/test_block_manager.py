"""Block pool and block tables: exact block ids, reference counts and free-queue order."""

from __future__ import annotations

import pytest

from pagedllm.core.block_manager import BlockManager
from pagedllm.core.block_pool import BlockPool, NoFreeBlocksError


def assert_pool_consistent(pool: BlockPool) -> None:
    free = pool.free_block_ids()
    assert len(free) == len(set(free)), "a block is twice in the free queue"
    for block_id in range(pool.num_blocks):
        assert (pool.ref_count(block_id) == 0) == (block_id in free)
    assert pool.num_free_blocks + pool.num_used_blocks == pool.num_blocks


def test_pool_reuses_freed_blocks_last_freed_first_before_never_used_ones():
    pool = BlockPool(4)
    assert [pool.allocate() for _ in range(3)] == [0, 1, 2]
    assert pool.free_block_ids() == [3] and pool.num_touched_blocks == 3
    pool.free(1)
    pool.free(0)
    assert pool.free_block_ids() == [0, 1, 3]
    assert [pool.allocate() for _ in range(3)] == [0, 1, 3]
    assert pool.num_touched_blocks == 4
    assert_pool_consistent(pool)


def test_pool_reference_counts():
    pool = BlockPool(2)
    block = pool.allocate()
    pool.incref(block)
    assert pool.ref_count(block) == 2
    pool.free(block)
    assert pool.ref_count(block) == 1 and block not in pool.free_block_ids()
    pool.free(block)
    assert pool.ref_count(block) == 0 and pool.free_block_ids() == [0, 1]
    assert_pool_consistent(pool)


def test_pool_empty_raises():
    pool = BlockPool(1)
    pool.allocate()
    with pytest.raises(NoFreeBlocksError):
        pool.allocate()


def test_block_table_grows_one_block_at_a_time():
    manager = BlockManager(num_blocks=8, block_size=4)
    # 6 tokens: 2 blocks, the second holds 2 of 4 slots.
    manager.allocate_slots("a", 0, 6)
    assert manager.get_block_table("a") == [0, 1]
    # Tokens 7 and 8 fit in block 1: no new block.
    manager.allocate_slots("a", 6, 2)
    assert manager.get_block_table("a") == [0, 1]
    # Token 9 opens block 2.
    manager.allocate_slots("a", 8, 1)
    assert manager.get_block_table("a") == [0, 1, 2]
    assert manager.num_slots_reserved() == 12
    manager.allocate_slots("b", 0, 1)
    assert manager.get_block_table("b") == [3]
    assert_pool_consistent(manager.pool)


def test_can_allocate_counts_only_missing_blocks():
    manager = BlockManager(num_blocks=3, block_size=4)
    manager.allocate_slots("a", 0, 8)  # blocks 0, 1
    assert manager.can_allocate("a", 8, 4)  # needs block 2
    assert not manager.can_allocate("a", 8, 5)  # would need 2 more
    assert manager.can_allocate("b", 0, 4)
    assert not manager.can_allocate("b", 0, 5)


def test_free_returns_tail_first_and_everything():
    manager = BlockManager(num_blocks=5, block_size=2)
    manager.allocate_slots("a", 0, 6)  # 0, 1, 2
    manager.allocate_slots("b", 0, 2)  # 3
    manager.free("a")
    # a's blocks, freed tail first, are reused last freed first; then the never-used block 4.
    assert manager.pool.free_block_ids() == [0, 1, 2, 4]
    manager.free("b")
    manager.free("b")  # freeing twice is a no-op for an unknown request
    assert manager.num_free_blocks == 5
    assert_pool_consistent(manager.pool)
