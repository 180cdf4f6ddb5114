"""Physical KV-cache blocks of one pool: O(1) allocation and freeing, reference counts, and the
prefix cache (hash -> block) with lazy LRU eviction; blocks handed out before are reused before
a never-used one, so that a pool committed as it is used stays as small as the work."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass


class NoFreeBlocksError(RuntimeError):
    """A block was requested from an empty pool; callers check `num_free_blocks` first."""


@dataclass
class CachedBlockKey:
    """What a cached block holds, checked on every hit so a hash collision is only a miss."""

    parent_hash: int
    token_ids: tuple[int, ...]


# The blocks a pool touches (hands out for the first time) before it evicts cached blocks rather
# than touch more: 16,384 tokens of 16-token blocks (SmolLM2's 360 KiB blocks: 360 MiB; the KV
# committer holds 256 MiB committed at idle anyway).
DEFAULT_CACHE_FLOOR_BLOCKS = 1024


class BlockPool:
    """Owns the reference counts of `num_blocks` physical blocks and the prefix cache.

    Invariants:
      - a block is free exactly when its reference count is 0;
      - `num_free_blocks + num_used_blocks == num_blocks`;
      - blocks [0, num_touched_blocks) have been handed out at least once, the rest never;
      - `hash_to_block[h] == b` implies `block_hash[b] == h` (a freed block keeps its hash and
        stays findable until it is handed out again: eviction is lazy).

    Which free block `allocate` hands out, in this order:
      1. a touched block with no cached hash, the most recently freed first (it holds nothing
         worth keeping, and its pages are the likeliest to be in the CPU's caches);
      2. while fewer than `cache_floor_blocks` blocks have been touched, a never-touched block;
      3. a touched cached block, least recently freed first (the prefix cache's LRU);
         NOTE: callers free a table tail first, so within one request the last blocks, which
         the fewest other requests can share, are evicted first;
      4. a never-touched block, lowest id first.

    Why, past the floor, a cached block is evicted before a never-touched one is taken: the
    host KV pool is reserved and its pages committed only a little ahead of the highest block
    written (worker/kv_commit.py), so each never-touched block handed out makes resident memory
    grow for good, while an evicted block costs only a possible later prefix hit. So
    `num_touched_blocks` is the peak number of blocks in use at once once past the floor, and
    resident memory follows the work (issue 30) instead of walking through the whole pool as
    every finished request's cached blocks queue ahead of reuse. The prefix cache still keeps
    what is worth most: every block in use (shared by reference) and, in LRU order, the freed
    blocks that fit in the touched blocks; what it gives up is older history, which an LRU over
    the whole pool would have kept. Below the floor the pool behaves as vLLM's does (the cache
    grows into never-used blocks): a small pool, or the first blocks of a large one, costs
    little memory (the KV committer holds an idle reserve committed anyway), and a prefix
    cached just before a burst of other requests survives the burst.
    """

    def __init__(self, num_blocks: int, enable_caching: bool = False,
                 cache_floor_blocks: int = DEFAULT_CACHE_FLOOR_BLOCKS) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        if cache_floor_blocks < 0:
            raise ValueError(f"cache_floor_blocks must be >= 0, got {cache_floor_blocks}")
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        # Blocks the pool touches before it evicts a cached block rather than touch another.
        self.cache_floor_blocks = cache_floor_blocks
        self._ref_counts = [0] * num_blocks
        # Free touched blocks without a cached hash: a LIFO stack.
        self._free_uncached: list[int] = []
        # Free touched blocks with a cached hash, an O(1) LRU queue: popitem(last=False),
        # pop(key) and append are O(1).
        self._free_cached: OrderedDict[int, None] = OrderedDict()
        # Blocks [num_touched_blocks, num_blocks) were never handed out (all free).
        self.num_touched_blocks = 0
        self.block_hash: list[int | None] = [None] * num_blocks
        self._block_keys: list[CachedBlockKey | None] = [None] * num_blocks
        self.hash_to_block: dict[int, int] = {}
        self.num_evictions = 0

    @property
    def _floor(self) -> int:
        """The blocks touched before a free cached block is evicted rather than another touched."""
        return min(self.cache_floor_blocks, self.num_blocks)

    @property
    def num_free_blocks(self) -> int:
        return (len(self._free_uncached) + len(self._free_cached)
                + self.num_blocks - self.num_touched_blocks)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self.num_free_blocks

    @property
    def num_cached_blocks(self) -> int:
        return len(self.hash_to_block)

    def ref_count(self, block_id: int) -> int:
        return self._ref_counts[block_id]

    def snapshot(self) -> tuple[list[int], list[int | None]]:
        """Copies of the reference counts and cached hashes, by block id (the KV cache map)."""
        return list(self._ref_counts), list(self.block_hash)

    def free_block_ids(self) -> list[int]:
        """The free blocks in the order `allocate` hands them out; for tests and statistics."""
        uncached = list(reversed(self._free_uncached))
        never_used = range(self.num_touched_blocks, self.num_blocks)
        floor = max(0, self._floor - self.num_touched_blocks)
        return [*uncached, *never_used[:floor], *self._free_cached, *never_used[floor:]]

    def allocate(self) -> int:
        """Takes a free block (see the class docstring for which), evicting its cached hash if
        it has one."""
        if self._free_uncached:
            block_id = self._free_uncached.pop()
        elif self._free_cached and self.num_touched_blocks >= self._floor:
            block_id, _ = self._free_cached.popitem(last=False)
        elif self.num_touched_blocks < self.num_blocks:
            block_id = self.num_touched_blocks
            self.num_touched_blocks += 1
        else:
            raise NoFreeBlocksError("no free KV blocks")
        assert self._ref_counts[block_id] == 0
        self._evict(block_id)
        self._ref_counts[block_id] = 1
        return block_id

    def incref(self, block_id: int) -> None:
        """Adds a reference to a block in use, for sharing it between block tables."""
        assert self._ref_counts[block_id] > 0, f"block {block_id} is free"
        self._ref_counts[block_id] += 1

    def free(self, block_id: int) -> None:
        """Drops one reference; the block is free again when none are left."""
        assert self._ref_counts[block_id] > 0, f"block {block_id} freed twice"
        self._ref_counts[block_id] -= 1
        if self._ref_counts[block_id] == 0:
            if self.block_hash[block_id] is None:
                self._free_uncached.append(block_id)
            else:
                self._free_cached[block_id] = None

    # ---- prefix cache --------------------------------------------------------------------

    def lookup(self, block_hash: int, parent_hash: int, token_ids: Sequence[int]) -> int | None:
        """The cached block holding exactly these tokens after this parent, if any."""
        block_id = self.hash_to_block.get(block_hash)
        if block_id is None:
            return None
        key = self._block_keys[block_id]
        if key is None or key.parent_hash != parent_hash or key.token_ids != tuple(token_ids):
            return None  # a hash collision: treat as a miss
        return block_id

    def touch(self, block_id: int) -> None:
        """Takes a reference to a cached block, reviving it from the free queue if needed."""
        if self._ref_counts[block_id] == 0:
            # Only cached blocks are found, and a free cached block waits in the LRU queue.
            del self._free_cached[block_id]
        self._ref_counts[block_id] += 1

    def cache_block(
        self, block_id: int, block_hash: int, parent_hash: int, token_ids: Sequence[int]
    ) -> None:
        """Registers a block that just filled up. An existing entry for the hash is kept.

        NOTE: cached blocks are never de-duplicated, so block ids in tables never change.
        """
        if not self.enable_caching or self.block_hash[block_id] is not None:
            return
        if block_hash in self.hash_to_block:
            return
        self.block_hash[block_id] = block_hash
        self._block_keys[block_id] = CachedBlockKey(parent_hash, tuple(token_ids))
        self.hash_to_block[block_hash] = block_id

    def _evict(self, block_id: int) -> None:
        block_hash = self.block_hash[block_id]
        if block_hash is None:
            return
        del self.hash_to_block[block_hash]
        self.block_hash[block_id] = None
        self._block_keys[block_id] = None
        self.num_evictions += 1
