"""Resident memory that follows use (issue 30): the block pool hands out blocks it handed out
before (free, then, past its cache floor, cached least recently freed first) before a never-used
one, so past the floor the blocks ever touched stay exactly the peak in use at once, and the
prefix cache still finds what it kept."""

from __future__ import annotations

import random

import pytest
from test_block_manager import assert_pool_consistent
from test_sharing import hashes_of

from pagedllm.core.block_manager import BlockManager
from pagedllm.core.block_pool import BlockPool

BLOCK_SIZE = 4


def test_touched_blocks_are_reused_before_never_used_ones():
    pool = BlockPool(8, enable_caching=True, cache_floor_blocks=0)
    blocks = [pool.allocate() for _ in range(4)]
    assert blocks == [0, 1, 2, 3] and pool.num_touched_blocks == 4
    pool.cache_block(1, block_hash=11, parent_hash=0, token_ids=[1])
    for block_id in reversed(blocks):  # tail first, as block tables are freed
        pool.free(block_id)
    # Uncached 0, 2, 3 (last freed first), then the cached 1, then never-used 4..7.
    assert pool.free_block_ids() == [0, 2, 3, 1, 4, 5, 6, 7]
    assert [pool.allocate() for _ in range(3)] == [0, 2, 3]
    assert pool.lookup(11, 0, [1]) == 1 and pool.num_evictions == 0
    assert pool.allocate() == 1  # evicted: the pool would otherwise grow
    assert pool.lookup(11, 0, [1]) is None and pool.num_evictions == 1
    assert pool.num_touched_blocks == 4
    assert pool.allocate() == 4 and pool.num_touched_blocks == 5
    assert_pool_consistent(pool)


def test_below_the_floor_the_cache_grows_into_never_used_blocks():
    pool = BlockPool(8, enable_caching=True, cache_floor_blocks=3)
    assert [pool.allocate() for _ in range(2)] == [0, 1]
    pool.cache_block(0, block_hash=10, parent_hash=0, token_ids=[0])
    pool.cache_block(1, block_hash=11, parent_hash=10, token_ids=[1])
    pool.free(1)
    pool.free(0)
    assert pool.free_block_ids() == [2, 1, 0, 3, 4, 5, 6, 7]
    assert pool.allocate() == 2  # never used, the floor not reached: the cache is kept
    assert pool.num_evictions == 0 and pool.lookup(11, 10, [1]) == 1
    assert pool.allocate() == 1 and pool.num_evictions == 1  # past it: evicted first
    assert pool.allocate() == 0 and pool.allocate() == 3
    assert_pool_consistent(pool)
    with pytest.raises(ValueError, match="cache_floor_blocks"):
        BlockPool(8, cache_floor_blocks=-1)


def test_requests_one_after_another_keep_reusing_the_same_blocks():
    """Before, freed blocks queued behind the never-used ones, and each request walked further
    into the pool."""
    manager = BlockManager(num_blocks=1000, block_size=BLOCK_SIZE, enable_prefix_caching=True)
    manager.pool.cache_floor_blocks = 0
    rng = random.Random(0)
    for i in range(50):
        tokens = [rng.randrange(1000) for _ in range(rng.randint(5, 40))]
        manager.allocate_slots(f"r{i}", 0, len(tokens))
        manager.cache_full_blocks(f"r{i}", hashes_of(tokens), tokens, len(tokens))
        manager.free(f"r{i}")
    assert manager.pool.num_touched_blocks == 10  # the longest request: 40 tokens


@pytest.mark.parametrize("floor", [0, 30])
def test_touched_blocks_are_the_peak_in_use_and_prefix_hits_are_still_found(floor):
    """Random requests with shared prefixes arrive, grow, fork and finish; after every step the
    blocks ever handed out are the most in use at once (or, below it, at most the floor), and a
    request whose prefix is in use by another one hits it."""
    rng = random.Random(1)
    manager = BlockManager(num_blocks=400, block_size=BLOCK_SIZE, enable_prefix_caching=True)
    pool = manager.pool
    pool.cache_floor_blocks = floor
    prefixes = [[rng.randrange(1000) for _ in range(4 * rng.randint(2, 6))] for _ in range(3)]
    live: dict[str, list[int]] = {}
    peak = num_hits = 0
    for i in range(300):
        if live and (len(live) > 8 or rng.random() < 0.4):
            seq_id = rng.choice(sorted(live))
            manager.free(seq_id)
            del live[seq_id]
        else:
            prefix = rng.choice(prefixes)
            tokens = prefix + [rng.randrange(1000) for _ in range(rng.randint(1, 30))]
            seq_id = f"r{i}"
            hashes = hashes_of(tokens)
            hit = manager.find_prefix(hashes, tokens, len(tokens))
            # The prefix's blocks are in use by a live request with it: they must hit.
            if any(live_tokens[:len(prefix)] == prefix for live_tokens in live.values()):
                assert hit.num_blocks >= len(prefix) // BLOCK_SIZE
            num_hits += hit.num_blocks > 0
            computed = hit.num_blocks * BLOCK_SIZE
            manager.attach_prefix(seq_id, hit)
            manager.allocate_slots(seq_id, computed, len(tokens) - computed)
            manager.cache_full_blocks(seq_id, hashes, tokens, len(tokens))
            live[seq_id] = tokens
            if rng.random() < 0.2:
                manager.fork(seq_id, seq_id + "-fork")
                manager.allocate_slots(seq_id + "-fork", len(tokens), 1)  # copy-on-write
                live[seq_id + "-fork"] = tokens
        peak = max(peak, pool.num_used_blocks)
        assert pool.num_touched_blocks == peak if peak >= floor else (
            pool.num_touched_blocks <= floor)
        assert_pool_consistent(pool)
    assert 30 < peak < 100 and num_hits > 100  # far below the pool; the cache served most
    for seq_id in list(live):
        manager.free(seq_id)
    # Every prefix is still cached (freed last, evicted last) and hits again.
    for prefix in prefixes:
        tokens = prefix + [1]
        assert manager.find_prefix(hashes_of(tokens), tokens, len(tokens)).num_blocks == (
            len(prefix) // BLOCK_SIZE)


def test_an_engine_touches_no_more_blocks_than_it_uses_at_once(tiny_llama_factory):
    """Through LLMEngine, the pool past its floor: batches of fresh prompts one after another
    keep to the blocks of the busiest batch (before, each batch took never-used blocks and
    walked through the pool)."""
    from pagedllm import LLM, SamplingParams

    llm = LLM(str(tiny_llama_factory(num_heads=4, num_kv_heads=2)), num_kv_blocks=512,
              block_size=8, dtype="float32")
    engine = llm.llm_engine
    engine.block_manager.pool.cache_floor_blocks = 0
    rng = random.Random(2)
    batch_blocks = []  # the most blocks each batch can hold at once: every request's last token
    for batch in range(4):
        batch_blocks.append(0)
        for i in range(6):
            prompt = [rng.randrange(3, 512) for _ in range(rng.randint(10, 40))]
            max_tokens = rng.randint(1, 12)
            batch_blocks[-1] += -(-(len(prompt) + max_tokens) // 8)
            engine.add_request(f"b{batch}-{i}", {"prompt_token_ids": prompt},
                               SamplingParams(max_tokens=max_tokens, ignore_eos=True))
        while engine.has_unfinished_requests():
            engine.step()
    stats = engine.get_stats()
    assert stats.num_cached_blocks > 0 and stats.num_prefix_cache_evictions > 0
    assert engine.block_manager.pool.num_touched_blocks <= max(batch_blocks) < sum(batch_blocks)


@pytest.mark.parametrize("mode", ["start", "ahead"])
def test_a_pool_written_at_start_lets_the_cache_use_every_block(tiny_llama_factory, monkeypatch,
                                                                mode):
    """With PAGEDLLM_KV_POOL_COMMIT=start the whole pool is resident from the start, so the
    engine's floor is the whole pool (the prefix cache's LRU over every block, as vLLM's);
    committed as used (`ahead`), the default floor keeps resident memory to the work."""
    from pagedllm import LLM
    from pagedllm.core.block_pool import DEFAULT_CACHE_FLOOR_BLOCKS

    monkeypatch.setenv("PAGEDLLM_KV_POOL_COMMIT", mode)
    llm = LLM(str(tiny_llama_factory(num_heads=4, num_kv_heads=2)), num_kv_blocks=64,
              block_size=8, dtype="float32")
    pool = llm.llm_engine.block_manager.pool
    assert pool.cache_floor_blocks == (64 if mode == "start" else DEFAULT_CACHE_FLOOR_BLOCKS)
