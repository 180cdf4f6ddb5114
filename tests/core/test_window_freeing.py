"""Sliding windows in the block manager: blocks wholly before every window of a sequence go
back to the pool as it advances; their entries become NULL_BLOCK, which forks, swaps, the
prefix cache and freeing skip, and which the attention metadata maps to block 0."""

from __future__ import annotations

import pytest

from pagedllm.attention import build_attention_metadata
from pagedllm.core.block_manager import NULL_BLOCK, BlockManager


def test_blocks_before_the_window_are_freed_and_skipped_everywhere() -> None:
    manager = BlockManager(10, block_size=4, num_cpu_blocks=10, sliding_window=6)
    # A 14-token prompt: blocks 0-3 (positions 0-15).
    manager.allocate_slots("a", 0, 14)
    assert manager.get_block_table("a") == [0, 1, 2, 3] and manager.num_free_blocks == 6
    # Token 14 sees positions 9-14: blocks 0 and 1 (positions 0-7) are dead.
    manager.allocate_slots("a", 14, 1)
    assert manager.get_block_table("a") == [NULL_BLOCK, NULL_BLOCK, 2, 3]
    assert manager.num_free_blocks == 8 and manager.num_logical_blocks() == 2
    # Token 16 (sees 11-16) opens a block, the freed block 0 before a never-used one, and
    # kills block 2.
    manager.allocate_slots("a", 15, 2)
    assert manager.get_block_table("a") == [NULL_BLOCK, NULL_BLOCK, 2, 3, 0]
    manager.allocate_slots("a", 17, 1)  # token 17 sees 12-17: block 2 (8-11) goes
    assert manager.get_block_table("a") == [NULL_BLOCK] * 3 + [3, 0]
    assert manager.num_free_blocks == 8
    # A fork shares the live blocks only.
    manager.fork("a", "b")
    assert manager.pool.ref_count(3) == 2 and manager.num_free_blocks == 8
    # Swapping moves the live blocks once and keeps the NULL entries.
    copies = manager.swap_out(["a", "b"])
    assert [src for src, _ in copies] == [0, 3] and manager.num_free_blocks == 10
    assert manager._cpu_tables["a"][:3] == [NULL_BLOCK] * 3
    manager.swap_in(["a", "b"])
    assert manager.get_block_table("b")[:3] == [NULL_BLOCK] * 3
    assert manager.num_free_blocks == 8
    # The kernel reads block 0 where the table holds NULL_BLOCK.
    metadata = build_attention_metadata([1], [18], [manager.get_block_table("a")], 4)
    assert metadata.block_tables.tolist()[0][:3] == [0, 0, 0]
    manager.free("a")
    manager.free("b")
    assert manager.num_free_blocks == 10 and manager.cpu_pool.num_free_blocks == 10


def test_a_prefill_keeps_every_block_its_queries_see() -> None:
    """Blocks go only once no query of the step can see them: a chunk's first token decides."""
    manager = BlockManager(20, block_size=4, sliding_window=6, enable_prefix_caching=True)
    manager.allocate_slots("a", 0, 40)  # one chunk: token 0 sees block 0
    assert NULL_BLOCK not in manager.get_block_table("a")
    hashes = list(range(1, 11))
    manager.cache_full_blocks("a", hashes, list(range(40)), 40)
    manager.allocate_slots("a", 40, 1)  # token 40 sees 35-40: blocks 0-7 go, still cached
    assert manager.get_block_table("a")[:8] == [NULL_BLOCK] * 8
    assert manager.num_free_blocks == 20 - 3 and manager.pool.num_cached_blocks == 10
    assert manager.cache_full_blocks("a", hashes, list(range(41)), 41) == 10


def test_a_bad_window_is_refused() -> None:
    with pytest.raises(ValueError, match="sliding_window must be >= 1"):
        BlockManager(4, block_size=4, sliding_window=0)
