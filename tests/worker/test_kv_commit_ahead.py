"""The host KV pool committed ahead of use (PAGEDLLM_KV_POOL_COMMIT=ahead): the committer
follows the highest block written, commits every layer's keys and values that far ahead and no
further, stops with its engine, and the engine gives the tokens of a pool written at start."""

from __future__ import annotations

import ctypes
import gc
import mmap
import os
import time

import pytest
import torch

from pagedllm.worker.host_memory import huge_page_reserved
from pagedllm.worker.kv_commit import KVPoolCommitter

linux = pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="Linux's /proc")

NUM_BLOCKS = 256
BLOCK = (16, 2, 64)  # slots, kv heads, head size: 4 KiB of bf16 per key (or value) block


def reserved_pools(num_layers: int = 3) -> list[torch.Tensor]:
    return [huge_page_reserved((2, NUM_BLOCKS, *BLOCK), torch.bfloat16)
            for _ in range(num_layers)]


def wait_for(condition, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "the committer did not get there"
        time.sleep(0.01)


def committed_to(committer: KVPoolCommitter, num_blocks: int):
    return lambda: committer.committed == num_blocks


def resident(address: int, nbytes: int) -> list[bool]:
    """Whether each 4 KiB page of the range is in memory (mincore)."""
    libc = ctypes.CDLL(None, use_errno=True)
    page = mmap.PAGESIZE
    start = address - address % page
    num_pages = -(-(address + nbytes - start) // page)
    vec = (ctypes.c_ubyte * num_pages)()
    assert libc.mincore(ctypes.c_void_p(start), ctypes.c_size_t(num_pages * page), vec) == 0
    return [bool(v & 1) for v in vec]


@linux
def test_the_committer_follows_the_highest_written_block_in_every_layer():
    pools = reserved_pools()
    committer = KVPoolCommitter(pools, blocks_ahead=8, poll_seconds=0.001)
    try:
        wait_for(lambda: committer.committed == 8)
        assert committer.written == 0
        for cache in pools:
            for half in (0, 1):
                assert all(resident(cache[half, 0].data_ptr(), 8 * 4096))
        # A step writes the first slot of blocks 0..20 (the pool hands them out lowest first).
        for cache in pools:
            cache[:, :21, 0].fill_(0.5)
        # Within the committed range only: block 5's write moves the mark to block 6 first.
        wait_for(lambda: committer.written == 21 and committer.committed == 29)
        for cache in pools:
            for half in (0, 1):
                assert all(resident(cache[half, 0].data_ptr(), 29 * 4096))
        # The pool's data is what was written: committing never writes.
        assert all(bool((c[:, :21, 0] == 0.5).all()) and int(c[:, 21:].count_nonzero()) == 0
                   for c in pools)
        assert not committer.failed
    finally:
        committer.stop(timeout=10)


@linux
def test_a_negative_zero_key_counts_as_written():
    pools = reserved_pools(1)
    committer = KVPoolCommitter(pools, blocks_ahead=4, poll_seconds=0.001)
    try:
        wait_for(lambda: committer.committed == 4)
        pools[0][0, 2, 0, 0, 0] = -0.0
        wait_for(lambda: committer.written == 3)
    finally:
        committer.stop(timeout=10)


def _resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@linux
def test_a_large_pool_is_resident_only_as_far_as_the_committer_went():
    before = _resident_bytes()
    pool = huge_page_reserved((2, 16384, *BLOCK), torch.bfloat16)  # 128 MiB
    committer = KVPoolCommitter([pool], blocks_ahead=1024, poll_seconds=0.001)  # 8 MiB
    try:
        wait_for(lambda: committer.committed == 1024)
        time.sleep(0.05)  # a few more looks: nothing written, nothing more committed
        assert committer.committed == 1024
        assert _resident_bytes() - before < 32 << 20
    finally:
        committer.stop(timeout=10)


def test_the_thread_ends_with_its_engine():
    committer = KVPoolCommitter(reserved_pools(1), blocks_ahead=2, poll_seconds=0.001)
    thread = committer._thread
    wait_for(committed_to(committer, 2))
    del committer
    gc.collect()
    thread.join(timeout=10)
    assert not thread.is_alive()


def test_the_thread_ends_once_the_pool_is_committed():
    committer = KVPoolCommitter(reserved_pools(1), blocks_ahead=NUM_BLOCKS + 5,
                                poll_seconds=0.001)
    committer._thread.join(timeout=30)
    assert not committer._thread.is_alive() and committer.committed == NUM_BLOCKS
