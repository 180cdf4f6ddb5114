"""Physical KV-cache blocks of one pool: O(1) allocation and freeing with reference counts."""

from __future__ import annotations

from collections import deque


class NoFreeBlocksError(RuntimeError):
    """Raised when a block is requested from an empty pool; callers check `num_free_blocks` first."""


class BlockPool:
    """Owns the reference counts of `num_blocks` physical blocks.

    Invariants: a block id is in the free queue exactly when its reference count is 0, and
    `num_free_blocks + num_used_blocks == num_blocks`. Freed blocks go to the back of the queue
    and allocation takes from the front, so recently freed blocks are reused last.
    """

    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        self.num_blocks = num_blocks
        self._ref_counts = [0] * num_blocks
        self._free_block_ids: deque[int] = deque(range(num_blocks))

    @property
    def num_free_blocks(self) -> int:
        return len(self._free_block_ids)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self._free_block_ids)

    def ref_count(self, block_id: int) -> int:
        return self._ref_counts[block_id]

    def free_block_ids(self) -> list[int]:
        """The free queue in allocation order (front first); for tests and statistics."""
        return list(self._free_block_ids)

    def allocate(self) -> int:
        """Takes the block at the front of the free queue with reference count 1."""
        if not self._free_block_ids:
            raise NoFreeBlocksError("no free KV blocks")
        block_id = self._free_block_ids.popleft()
        assert self._ref_counts[block_id] == 0
        self._ref_counts[block_id] = 1
        return block_id

    def incref(self, block_id: int) -> None:
        """Adds a reference to a block in use, for sharing it between block tables."""
        assert self._ref_counts[block_id] > 0, f"block {block_id} is free"
        self._ref_counts[block_id] += 1

    def free(self, block_id: int) -> None:
        """Drops one reference; the block returns to the free queue when none are left."""
        assert self._ref_counts[block_id] > 0, f"block {block_id} freed twice"
        self._ref_counts[block_id] -= 1
        if self._ref_counts[block_id] == 0:
            self._free_block_ids.append(block_id)
