"""Per-sequence block tables on top of the device pool (and a host pool for swapping).

Tables are keyed by sequence id. A table is append-only except for copy-on-write, which
replaces one shared block by a private copy before the sequence writes into it, and, with a
sliding window, the blocks that fell wholly out of every window of the sequence, which go back
to the pool as it advances (their entries become NULL_BLOCK, so a table keeps one entry per
logical block).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from pagedllm.core.block_hash import ROOT_HASH
from pagedllm.core.block_pool import DEFAULT_CACHE_FLOOR_BLOCKS, BlockPool

# A table entry whose block was freed because no query of the sequence can see it any more
# (sliding window). The attention metadata maps it to block 0, which the backends never weigh.
NULL_BLOCK = -1


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass
class PrefixHit:
    """The cached blocks found for the start of a sequence."""

    block_ids: list[int]
    # Of those, how many sit in the free queue (taking them uses up free blocks).
    num_free: int

    @property
    def num_blocks(self) -> int:
        return len(self.block_ids)


class BlockManager:
    """Maps sequences to physical blocks: allocation, forking, copy-on-write, prefix hits, swap.

    `can_*`/`*` come in pairs: the scheduler asks first and preempts when the answer is no.
    Every method that moves data returns the copies the worker must execute before the next
    forward pass: (source block, destination block) pairs.
    """

    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        num_cpu_blocks: int = 0,
        enable_prefix_caching: bool = False,
        sliding_window: int | None = None,
        cache_floor_blocks: int = DEFAULT_CACHE_FLOOR_BLOCKS,
    ) -> None:
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        if sliding_window is not None and sliding_window < 1:
            raise ValueError(f"sliding_window must be >= 1 or None, got {sliding_window}")
        self.block_size = block_size
        # Every layer's queries see at most this many positions (None: some layer sees all).
        self.sliding_window = sliding_window
        self.pool = BlockPool(num_blocks, enable_caching=enable_prefix_caching,
                              cache_floor_blocks=cache_floor_blocks)
        self.cpu_pool = BlockPool(num_cpu_blocks) if num_cpu_blocks > 0 else None
        self._block_tables: dict[str, list[int]] = {}
        self._cpu_tables: dict[str, list[int]] = {}
        # Prefix-cache counters, in tokens.
        self.prefix_cache_queries = 0
        self.prefix_cache_hits = 0

    @property
    def enable_prefix_caching(self) -> bool:
        return self.pool.enable_caching

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    def get_block_table(self, seq_id: str) -> list[int]:
        """The sequence's device table; the caller must not mutate it."""
        return self._block_tables.get(seq_id, [])

    def has_blocks(self, seq_id: str) -> bool:
        return seq_id in self._block_tables

    def num_slots_reserved(self) -> int:
        """Token slots of all allocated device blocks (used blocks x block size)."""
        return self.pool.num_used_blocks * self.block_size

    def num_logical_blocks(self) -> int:
        """Blocks summed over all device tables: more than the used blocks when they are shared."""
        return sum(b != NULL_BLOCK for t in self._block_tables.values() for b in t)

    def snapshot_tables(self) -> tuple[dict[str, list[int]], dict[str, list[int]]]:
        """Copies of the device and host block tables by sequence id (the KV cache map)."""
        return ({seq_id: list(t) for seq_id, t in self._block_tables.items()},
                {seq_id: list(t) for seq_id, t in self._cpu_tables.items()})

    # ---- allocation ----------------------------------------------------------------------

    def num_blocks_needed(
        self, seq_id: str, num_computed: int, num_new: int, prefix_hit: PrefixHit | None = None
    ) -> int:
        """Free blocks that attaching `prefix_hit` and allocate_slots would take together:
        revived cached blocks, growth, and one more for copy-on-write."""
        table = self._block_tables.get(seq_id, ())
        num_revived = 0
        if prefix_hit is not None:
            assert not table, "prefix hits attach to a new table"
            table, num_revived = prefix_hit.block_ids, prefix_hit.num_free
        needed = max(cdiv(num_computed + num_new, self.block_size) - len(table), 0)
        if self._needs_copy_on_write(table, num_computed, num_new):
            needed += 1
        return needed + num_revived

    def _needs_copy_on_write(self, table: Sequence[int], num_computed: int, num_new: int) -> bool:
        index = num_computed // self.block_size
        return num_new > 0 and index < len(table) and self.pool.ref_count(table[index]) > 1

    def can_allocate(
        self, seq_id: str, num_computed: int, num_new: int, prefix_hit: PrefixHit | None = None
    ) -> bool:
        needed = self.num_blocks_needed(seq_id, num_computed, num_new, prefix_hit)
        return needed <= self.pool.num_free_blocks

    def attach_prefix(self, seq_id: str, prefix_hit: PrefixHit) -> None:
        """Starts a new table with the cached blocks of a prefix hit (references taken)."""
        assert not self._block_tables.get(seq_id), "prefix hits attach to a new table"
        for block_id in prefix_hit.block_ids:
            self.pool.touch(block_id)
        self._block_tables[seq_id] = list(prefix_hit.block_ids)

    def allocate_slots(self, seq_id: str, num_computed: int, num_new: int) -> list[tuple[int, int]]:
        """Makes room for tokens [num_computed, num_computed + num_new) of a sequence.

        If the first block written is shared, it is replaced by a fresh block and a copy
        (shared -> fresh) is returned: copy-on-write. With a sliding window, the blocks before
        the window of token `num_computed` (and so of every later token) are freed first.
        """
        assert self.can_allocate(seq_id, num_computed, num_new), "call can_allocate first"
        table = self._block_tables.setdefault(seq_id, [])
        if self.sliding_window is not None and num_new > 0:
            self._free_outside_window(table, num_computed)
        copies = []
        if self._needs_copy_on_write(table, num_computed, num_new):
            index = num_computed // self.block_size
            shared = table[index]
            private = self.pool.allocate()
            self.pool.free(shared)
            table[index] = private
            copies.append((shared, private))
        for _ in range(cdiv(num_computed + num_new, self.block_size) - len(table)):
            table.append(self.pool.allocate())
        return copies

    def _free_outside_window(self, table: list[int], first_query_pos: int) -> None:
        """Frees the blocks wholly before the window of a query at `first_query_pos`, last
        first (as `free` does), leaving NULL_BLOCK in their entries.

        E.g., block_size 4, window 6, first query at position 13: it sees 8..13, so blocks 0
        and 1 (positions 0..7) go.
        """
        num_dead = min(max(0, first_query_pos - self.sliding_window + 1) // self.block_size,
                       len(table))
        for index in reversed(range(num_dead)):
            if table[index] == NULL_BLOCK:
                break  # freed by an earlier step, as are all before it
            self.pool.free(table[index])
            table[index] = NULL_BLOCK

    def fork(self, parent_seq_id: str, child_seq_id: str) -> None:
        """The child shares every block of the parent (reference counts up)."""
        assert child_seq_id not in self._block_tables
        table = self._block_tables.get(parent_seq_id, [])
        for block_id in table:
            if block_id != NULL_BLOCK:
                self.pool.incref(block_id)
        self._block_tables[child_seq_id] = list(table)

    def free(self, seq_id: str) -> None:
        """Returns the sequence's blocks (device and host), tail first."""
        for tables, pool in ((self._block_tables, self.pool), (self._cpu_tables, self.cpu_pool)):
            table = tables.pop(seq_id, None)
            if table is not None:
                for block_id in reversed(table):
                    if block_id != NULL_BLOCK:
                        pool.free(block_id)

    def trim(self, seq_id: str, num_tokens: int) -> None:
        """Frees the tail blocks past the first `num_tokens` tokens, last first: the blocks
        that held only rejected speculative tokens."""
        table = self._block_tables.get(seq_id)
        if table is not None:
            while len(table) > cdiv(num_tokens, self.block_size):
                self.pool.free(table.pop())

    # ---- prefix caching ------------------------------------------------------------------

    def find_prefix(self, block_hashes: Sequence[int], token_ids: Sequence[int],
                    num_tokens: int) -> PrefixHit:
        """The longest run of cached blocks at the start of `token_ids[:num_tokens]`.

        NOTE: at most `num_tokens - 1` tokens can hit, so the last token is always computed and
        produces logits.
        """
        hit = PrefixHit([], 0)
        if not self.enable_prefix_caching:
            return hit
        max_blocks = min((num_tokens - 1) // self.block_size, len(block_hashes))
        parent = ROOT_HASH
        for index in range(max_blocks):
            start = index * self.block_size
            block_id = self.pool.lookup(
                block_hashes[index], parent, token_ids[start : start + self.block_size]
            )
            if block_id is None:
                break
            hit.block_ids.append(block_id)
            hit.num_free += self.pool.ref_count(block_id) == 0
            parent = block_hashes[index]
        return hit

    def record_prefix_query(self, num_tokens: int, num_hit_tokens: int) -> None:
        self.prefix_cache_queries += num_tokens
        self.prefix_cache_hits += num_hit_tokens

    def cache_full_blocks(
        self, seq_id: str, block_hashes: Sequence[int], token_ids: Sequence[int],
        num_computed: int, first_index: int = 0,
    ) -> int:
        """Registers the sequence's full, computed blocks from `first_index` in the prefix cache.

        Returns the number of leading blocks registered so far (the next `first_index`).
        """
        table = self._block_tables.get(seq_id, [])
        num_full = min(num_computed // self.block_size, len(block_hashes), len(table))
        if not self.enable_prefix_caching:
            return num_full
        for index in range(first_index, num_full):
            if table[index] == NULL_BLOCK:  # freed by the window (registered when it filled)
                continue
            parent = block_hashes[index - 1] if index else ROOT_HASH
            start = index * self.block_size
            self.pool.cache_block(
                table[index], block_hashes[index], parent,
                token_ids[start : start + self.block_size],
            )
        return num_full

    # ---- swapping ------------------------------------------------------------------------

    def _distinct_blocks(self, tables: dict[str, list[int]], seq_ids: Iterable[str]) -> set[int]:
        return {b for seq_id in seq_ids for b in tables.get(seq_id, ()) if b != NULL_BLOCK}

    def can_swap_out(self, seq_ids: Sequence[str]) -> bool:
        if self.cpu_pool is None:
            return False
        num_blocks = len(self._distinct_blocks(self._block_tables, seq_ids))
        return num_blocks <= self.cpu_pool.num_free_blocks

    def swap_out(self, seq_ids: Sequence[str]) -> list[tuple[int, int]]:
        """Moves the sequences' device blocks to host blocks; a shared block moves once.

        Returns (device block, host block) copies to run before the device blocks are reused.
        """
        assert self.cpu_pool is not None and self.can_swap_out(seq_ids)
        mapping = self._move(seq_ids, self._block_tables, self.pool, self._cpu_tables,
                             self.cpu_pool)
        return sorted(mapping.items())

    def can_swap_in(self, seq_ids: Sequence[str]) -> bool:
        """Room for the swapped blocks plus, per sequence, one block for its next token."""
        needed = len(self._distinct_blocks(self._cpu_tables, seq_ids)) + len(seq_ids)
        return needed <= self.pool.num_free_blocks

    def swap_in(self, seq_ids: Sequence[str]) -> list[tuple[int, int]]:
        """Moves the sequences' host blocks back to fresh device blocks; returns (host, device)."""
        assert self.cpu_pool is not None
        mapping = self._move(seq_ids, self._cpu_tables, self.cpu_pool, self._block_tables,
                             self.pool)
        return sorted(mapping.items())

    def is_swapped(self, seq_id: str) -> bool:
        return seq_id in self._cpu_tables

    @staticmethod
    def _move(seq_ids, src_tables, src_pool: BlockPool, dst_tables, dst_pool: BlockPool):
        mapping: dict[int, int] = {}
        for seq_id in seq_ids:
            table = src_tables.pop(seq_id)
            new_table = []
            for block_id in table:
                if block_id == NULL_BLOCK:
                    new_table.append(NULL_BLOCK)
                    continue
                if block_id in mapping:
                    dst_pool.incref(mapping[block_id])
                else:
                    mapping[block_id] = dst_pool.allocate()
                new_table.append(mapping[block_id])
            for block_id in reversed(table):
                if block_id != NULL_BLOCK:
                    src_pool.free(block_id)
            dst_tables[seq_id] = new_table
        return mapping
