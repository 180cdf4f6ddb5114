"""Chained block hashes: a full block is identified by its tokens and everything before it."""

from __future__ import annotations

from collections.abc import Sequence

# Hash of the (empty) parent of a sequence's first block.
ROOT_HASH = hash(("pagedllm", "root"))


def hash_block_tokens(
    parent_hash: int, token_ids: Sequence[int], extra_keys: tuple = ()
) -> int:
    """Hash of one full block, chained over its parent's hash.

    NOTE: Python's hash of a tuple of ints is deterministic across processes (no salt), and a
    hit is always confirmed against the stored tokens, so a collision costs a miss, never
    wrong text.
    """
    return hash((parent_hash, tuple(token_ids), extra_keys))


def extend_block_hashes(
    block_hashes: list[int], token_ids: Sequence[int], block_size: int, num_tokens: int
) -> None:
    """Appends the hashes of the full blocks among the first `num_tokens` tokens not hashed yet.

    E.g. block_size 4, 2 hashes so far, num_tokens 13 -> hashes block 2 (tokens 8..11);
    tokens 12.. do not fill a block yet.
    """
    for index in range(len(block_hashes), num_tokens // block_size):
        parent = block_hashes[-1] if block_hashes else ROOT_HASH
        start = index * block_size
        block_hashes.append(hash_block_tokens(parent, token_ids[start : start + block_size]))
