"""The host KV pool committed ahead of use (PAGEDLLM_KV_POOL_COMMIT=ahead): the committer
follows the highest block written, commits every layer's keys and values that far ahead and no
further, in small pages while the process is busy and in huge pages (further ahead) once it is
idle, stops with its engine, and the engine gives the tokens of a pool written at start."""

from __future__ import annotations

import ctypes
import gc
import hashlib
import mmap
import os
import threading
import time

import pytest
import torch

from pagedllm.worker.host_memory import HUGE_PAGE_BYTES, collapse_pages, huge_page_reserved
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


def anon_huge_bytes(address: int) -> int:
    """AnonHugePages of this process's mapping that holds `address` (/proc/self/smaps)."""
    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            fields = line.split()
            if "-" in fields[0] and not fields[0].endswith(":"):
                start, end = (int(x, 16) for x in fields[0].split("-"))
                inside = start <= address < end
            elif inside and fields[0] == "AnonHugePages:":
                return int(fields[1]) * 1024
    raise AssertionError(f"no mapping holds {address:#x}")


def can_collapse() -> bool:
    probe = huge_page_reserved((HUGE_PAGE_BYTES,), torch.uint8, advise=False)
    probe[0] = 1
    return collapse_pages(probe.data_ptr(), HUGE_PAGE_BYTES) == 0


needs_collapse = pytest.mark.skipif(not os.path.exists("/proc/self/smaps") or not can_collapse(),
                                    reason="no MADV_COLLAPSE (Linux 6.1+) here")
BIG_BLOCKS = 2048  # 8 MiB per half: 4 whole huge pages in each, both halves 2 MiB aligned


@needs_collapse
def test_the_pool_is_committed_in_small_pages_and_collapsed_with_its_contents_when_idle():
    pool = huge_page_reserved((2, BIG_BLOCKS, *BLOCK), torch.bfloat16, advise=False)
    pool[:, :600, 0].fill_(0.5)  # blocks a step wrote (faulted in by the write itself)
    committer = KVPoolCommitter([pool], blocks_ahead=16, idle_blocks_ahead=1000,
                                poll_seconds=0.001, idle_seconds=0.05, huge_pages=False)
    try:
        # Idle: committed 1000 past the written 600; each half's pages wholly below block
        # 1600 (6.25 MiB: pages 0-2) made huge, no further.
        wait_for(lambda: committer.num_collapsed == 6)
        assert committer.written == 600 and committer.committed == 1600
        time.sleep(0.1)
        assert committer.num_collapsed == 6 and anon_huge_bytes(pool.data_ptr()) == 12 << 20
        assert bool((pool[:, :600, 0] == 0.5).all()) and int(pool[:, 600:].count_nonzero()) == 0
        assert int(pool[:, :600, 1:].count_nonzero()) == 0
        assert not committer.failed and committer._thread.is_alive()
    finally:
        committer.stop(timeout=10)


def _spin(stop: threading.Event) -> None:
    data = b"x" * (1 << 20)
    while not stop.is_set():
        hashlib.sha256(data).digest()  # CPU without the GIL


@needs_collapse
def test_a_busy_process_gets_the_near_margin_in_small_pages_and_the_rest_once_idle():
    pool = huge_page_reserved((2, BIG_BLOCKS, *BLOCK), torch.bfloat16, advise=False)
    stop = threading.Event()
    busy = threading.Thread(target=_spin, args=(stop,))
    busy.start()
    try:
        committer = KVPoolCommitter([pool], blocks_ahead=1024, idle_blocks_ahead=BIG_BLOCKS,
                                    poll_seconds=0.001, idle_seconds=0.2, huge_pages=False)
        wait_for(lambda: committer.committed == 1024)
        time.sleep(0.5)
        assert committer.committed == 1024 and committer.num_collapsed == 0
        assert anon_huge_bytes(pool.data_ptr()) == 0
    finally:
        stop.set()
        busy.join()
    try:
        # Idle now: the whole pool committed and collapsed (4 pages a half), then it ends.
        committer._thread.join(timeout=60)
        assert not committer._thread.is_alive()
        assert committer.committed == BIG_BLOCKS and committer.num_collapsed == 8
        assert anon_huge_bytes(pool.data_ptr()) == 16 << 20
    finally:
        committer.stop(timeout=10)


@linux
def test_blocks_to_commit_now_are_in_place_when_the_committer_is_made():
    pools = reserved_pools(2)
    committer = KVPoolCommitter(pools, blocks_ahead=1, commit_now=64, poll_seconds=0.001,
                                huge_pages=False)
    try:
        for cache in pools:  # before the thread's first look could get this far
            for half in (0, 1):
                assert all(resident(cache[half, 0].data_ptr(), 64 * 4096))
        assert committer.committed >= 64 and committer.written == 0
    finally:
        committer.stop(timeout=10)


def thp_possible() -> bool:
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return "[never]" not in f.read()
    except OSError:
        return False


needs_thp = pytest.mark.skipif(not os.path.exists("/proc/self/smaps") or not thp_possible(),
                               reason="no transparent huge pages here")


@needs_thp
def test_huge_pages_mode_commits_whole_huge_pages_once_a_block_is_written():
    pools = [huge_page_reserved((2, BIG_BLOCKS, *BLOCK), torch.bfloat16, advise=False)
             for _ in range(2)]
    committer = KVPoolCommitter(pools, blocks_ahead=600, commit_now=600, poll_seconds=0.001,
                                idle_seconds=1e9, huge_pages=True)
    try:
        assert committer.huge_pages
        # No reserve at start, and nothing before the first write.
        time.sleep(0.05)
        assert committer.committed == 0
        assert not any(resident(pools[1].data_ptr(), pools[1].numel() * 2))
        for cache in pools:
            cache[:, :10, 0].fill_(0.5)
        wait_for(lambda: committer.written == 10 and committer.committed == 610)
        # Each half's pages holding blocks 0-609 (the write faulted in the first, the committer
        # the second: blocks 512-1023), whole and huge; nothing past them.
        for cache in pools:
            for half in (0, 1):
                address = cache[half, 0].data_ptr()
                assert all(resident(address, 2 * HUGE_PAGE_BYTES))
                assert not any(resident(address + 2 * HUGE_PAGE_BYTES, HUGE_PAGE_BYTES))
            assert anon_huge_bytes(cache.data_ptr()) == 4 * HUGE_PAGE_BYTES
        assert bool((pools[1][:, :10, 0] == 0.5).all()) and int(pools[1][:, 10:].count_nonzero()) == 0
        assert not committer.failed
    finally:
        committer.stop(timeout=10)
