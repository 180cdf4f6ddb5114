"""Chained block hashes: a full block is identified by its tokens and everything before it."""

from __future__ import annotations

import functools
import struct
from collections.abc import Sequence
from hashlib import blake2b

# Hashes are 64-bit unsigned ints: small to store and compare, and a collision only costs a
# prefix-cache miss (see hash_block_tokens).
_DIGEST_SIZE = 8

# Hash of the (empty) parent of a sequence's first block.
ROOT_HASH = int.from_bytes(blake2b(b"pagedllm/root", digest_size=_DIGEST_SIZE).digest(), "little")


@functools.cache
def _packer(num_tokens: int) -> struct.Struct:
    """Little-endian layout of one block's hash input: parent hash (uint64), tokens (int64)."""
    return struct.Struct(f"<Q{num_tokens}q")


def hash_block_tokens(
    parent_hash: int, token_ids: Sequence[int], extra_keys: tuple = ()
) -> int:
    """Hash of one full block, chained over its parent's hash.

    blake2b over the parent hash and the token ids packed as little-endian 64-bit ints, then
    the repr of `extra_keys` (which must be ints, strings or tuples of them: a stable repr).

    NOTE: unlike Python's `hash()` of a string (salted per process by PYTHONHASHSEED), this is
    the same in every process, on every run and on every machine. A hit is always confirmed
    against the stored tokens and parent (BlockPool.lookup), so a collision costs a miss, never
    wrong text.
    """
    data = _packer(len(token_ids)).pack(parent_hash, *token_ids)
    if extra_keys:
        data += repr(extra_keys).encode()
    return int.from_bytes(blake2b(data, digest_size=_DIGEST_SIZE).digest(), "little")


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
