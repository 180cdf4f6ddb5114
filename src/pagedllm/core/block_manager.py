"""Per-request block tables: which physical blocks hold a request's logical KV blocks."""

from __future__ import annotations

from pagedllm.core.block_pool import BlockPool


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class BlockManager:
    """Maps each request to an append-only list of physical block ids.

    A table grows one block at a time as tokens arrive, so the only unused slots of a request
    are in the tail of its last block. `can_allocate`/`allocate_slots` come as a pair: the
    scheduler asks first and preempts when the answer is no.
    """

    def __init__(self, num_blocks: int, block_size: int) -> None:
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.block_size = block_size
        self.pool = BlockPool(num_blocks)
        self._block_tables: dict[str, list[int]] = {}

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    def num_blocks_needed(self, request_id: str, num_tokens: int) -> int:
        """New blocks the request needs so that its table holds `num_tokens` tokens."""
        table = self._block_tables.get(request_id, ())
        return max(cdiv(num_tokens, self.block_size) - len(table), 0)

    def can_allocate(self, request_id: str, num_tokens: int) -> bool:
        return self.num_blocks_needed(request_id, num_tokens) <= self.pool.num_free_blocks

    def allocate_slots(self, request_id: str, num_tokens: int) -> None:
        """Grows the request's table to hold `num_tokens` tokens in total."""
        num_new = self.num_blocks_needed(request_id, num_tokens)
        assert num_new <= self.pool.num_free_blocks, "call can_allocate first"
        table = self._block_tables.setdefault(request_id, [])
        for _ in range(num_new):
            table.append(self.pool.allocate())

    def get_block_table(self, request_id: str) -> list[int]:
        """The request's table; the caller must not mutate it."""
        return self._block_tables.get(request_id, [])

    def has_blocks(self, request_id: str) -> bool:
        return request_id in self._block_tables

    def free(self, request_id: str) -> None:
        """Returns every block of the request, tail first (the tail is the least reusable)."""
        table = self._block_tables.pop(request_id, None)
        if table is None:
            return
        for block_id in reversed(table):
            self.pool.free(block_id)

    def num_slots_reserved(self) -> int:
        """Token slots held by all tables together (allocated blocks x block size)."""
        return self.pool.num_used_blocks * self.block_size
