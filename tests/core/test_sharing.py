"""Block sharing scenarios with exact block ids: fork, copy-on-write, prefix cache, swap."""

from __future__ import annotations

from pagedllm.core.block_hash import ROOT_HASH, extend_block_hashes, hash_block_tokens
from pagedllm.core.block_manager import BlockManager
from test_block_manager import assert_pool_consistent


def test_fork_shares_every_block_and_copy_on_write_splits_the_tail():
    manager = BlockManager(num_blocks=8, block_size=4)
    # Parent: 6 tokens computed = block 0 full, block 1 holds 2 of 4.
    manager.allocate_slots("p", 0, 6)
    assert manager.get_block_table("p") == [0, 1]
    manager.fork("p", "c")
    assert manager.get_block_table("c") == [0, 1]
    assert [manager.pool.ref_count(b) for b in (0, 1)] == [2, 2]
    assert manager.num_logical_blocks() == 4 and manager.pool.num_used_blocks == 2
    # The child writes token 7 into shared block 1: it gets a private copy (block 2).
    assert manager.num_blocks_needed("c", 6, 1) == 1
    copies = manager.allocate_slots("c", 6, 1)
    assert copies == [(1, 2)]
    assert manager.get_block_table("c") == [0, 2]
    assert [manager.pool.ref_count(b) for b in (0, 1, 2)] == [2, 1, 1]
    # The parent now owns block 1 alone: writing needs no copy.
    assert manager.allocate_slots("p", 6, 1) == []
    assert manager.get_block_table("p") == [0, 1]
    # A full shared block is never copied: token 9 opens a new block.
    manager.allocate_slots("p", 7, 2)
    assert manager.get_block_table("p") == [0, 1, 3]
    manager.free("c")
    manager.free("p")
    assert manager.num_free_blocks == 8
    assert_pool_consistent(manager.pool)


def cached_manager(num_blocks=6) -> BlockManager:
    return BlockManager(num_blocks=num_blocks, block_size=4, enable_prefix_caching=True)


def hashes_of(tokens: list[int], block_size: int = 4) -> list[int]:
    hashes: list[int] = []
    extend_block_hashes(hashes, tokens, block_size, len(tokens))
    return hashes


def test_block_hashes_are_chained():
    tokens = list(range(10))
    h0 = hash_block_tokens(ROOT_HASH, [0, 1, 2, 3])
    h1 = hash_block_tokens(h0, [4, 5, 6, 7])
    assert hashes_of(tokens) == [h0, h1]  # tokens 8, 9 do not fill a block
    # The same tokens after a different prefix hash differently.
    assert hashes_of([9, 9, 9, 9, 4, 5, 6, 7])[1] != h1


def test_prefix_hit_reuses_cached_blocks_and_skips_the_last_token():
    manager = cached_manager()
    tokens_a = list(range(100, 111))  # 11 tokens: 2 full blocks + 3
    manager.allocate_slots("a", 0, 11)
    assert manager.get_block_table("a") == [0, 1, 2]
    manager.cache_full_blocks("a", hashes_of(tokens_a), tokens_a, num_computed=11)
    assert manager.pool.num_cached_blocks == 2
    # b shares a's first 8 tokens: both full blocks hit, b computes the rest.
    tokens_b = tokens_a[:8] + [7, 7]
    hit = manager.find_prefix(hashes_of(tokens_b), tokens_b, len(tokens_b))
    assert hit.block_ids == [0, 1] and hit.num_free == 0
    manager.attach_prefix("b", hit)
    manager.allocate_slots("b", 8, 2)
    assert manager.get_block_table("b") == [0, 1, 3]
    assert [manager.pool.ref_count(b) for b in (0, 1, 2, 3)] == [2, 2, 1, 1]
    # A prompt of exactly 8 cached tokens hits only one block: its last token is recomputed.
    hit = manager.find_prefix(hashes_of(tokens_a[:8]), tokens_a[:8], 8)
    assert hit.block_ids == [0]


def test_freed_cached_blocks_are_found_again_and_evicted_last_used_first():
    manager = cached_manager(num_blocks=4)
    tokens = list(range(50, 59))  # 9 tokens: blocks 0, 1 full, block 2 partial
    manager.allocate_slots("a", 0, 9)
    manager.cache_full_blocks("a", hashes_of(tokens), tokens, num_computed=9)
    manager.free("a")
    # Freed tail first, the blocks keep their hashes: the partial block 2 (no hash) is reused
    # first, then (the pool is under its cache floor) the never-used block 3, then the cached
    # blocks least recently freed first.
    assert manager.pool.free_block_ids() == [2, 3, 1, 0]
    hit = manager.find_prefix(hashes_of(tokens), tokens, 9)
    assert hit.block_ids == [0, 1] and hit.num_free == 2
    assert manager.can_allocate("b", 8, 1, hit)
    manager.attach_prefix("b", hit)  # revived out of the middle of the queue
    assert manager.pool.free_block_ids() == [2, 3]
    manager.free("b")
    assert manager.pool.free_block_ids() == [2, 3, 1, 0]
    # Taking three blocks reuses 2 (partial), takes 3 (never used) and then evicts cached 1.
    manager.allocate_slots("c", 0, 12)
    assert manager.get_block_table("c") == [2, 3, 1]
    assert manager.pool.num_evictions == 1
    hit = manager.find_prefix(hashes_of(tokens), tokens, 9)
    assert hit.block_ids == [0]  # block 1's entry is gone, so the chain stops after block 0


def test_hash_collision_is_a_miss():
    manager = cached_manager()
    tokens = [1, 2, 3, 4, 5]
    manager.allocate_slots("a", 0, 5)
    manager.cache_full_blocks("a", hashes_of(tokens), tokens, num_computed=5)
    # Pretend other tokens hash to the same value: the token check refuses the block.
    forged = [hashes_of(tokens)[0]]
    hit = manager.find_prefix(forged, [9, 9, 9, 9, 9], 5)
    assert hit.block_ids == []


def test_swap_out_moves_shared_blocks_once_and_back():
    manager = BlockManager(num_blocks=6, block_size=4, num_cpu_blocks=4)
    manager.allocate_slots("s0", 0, 6)  # blocks 0, 1
    manager.fork("s0", "s1")
    manager.allocate_slots("s1", 6, 1)  # copy-on-write: s1 -> [0, 2]
    assert manager.can_swap_out(["s0", "s1"])
    out = manager.swap_out(["s0", "s1"])
    # Three distinct device blocks (0 shared) move to three host blocks.
    assert out == [(0, 0), (1, 1), (2, 2)]
    assert manager.num_free_blocks == 6
    assert manager.cpu_pool.ref_count(0) == 2
    assert manager.is_swapped("s0") and not manager.has_blocks("s0")
    assert manager.can_swap_in(["s0", "s1"])
    back = manager.swap_in(["s0", "s1"])
    assert sorted(h for h, _ in back) == [0, 1, 2]
    table0, table1 = manager.get_block_table("s0"), manager.get_block_table("s1")
    assert table0[0] == table1[0] and table0[1] != table1[1]
    assert manager.pool.ref_count(table0[0]) == 2
    assert manager.cpu_pool.num_free_blocks == 4
    manager.free("s0")
    manager.free("s1")
    assert manager.num_free_blocks == 6
    assert_pool_consistent(manager.pool)
    assert_pool_consistent(manager.cpu_pool)


def test_swap_out_refused_when_the_host_pool_is_too_small():
    manager = BlockManager(num_blocks=6, block_size=4, num_cpu_blocks=1)
    manager.allocate_slots("s", 0, 8)
    assert not manager.can_swap_out(["s"])
