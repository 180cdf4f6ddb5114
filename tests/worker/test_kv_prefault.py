"""The host KV pool's first huge pages committed while the engine starts
(huge_page_stash.HugePageStash, cache_engine.start_kv_prefault): a thread commits 2 MiB pages
before the pool exists, the pool takes them by moving them (no copy), all layers' first pages
first, and they read as zeros, hold what is written and stay huge pages; the rest of the stash
is unmapped."""

from __future__ import annotations

import os
import time

import pytest
import torch

from pagedllm.worker import cache_engine
from pagedllm.worker.cache_engine import _pool_pages_in_order
from pagedllm.worker.host_memory import HUGE_PAGE_BYTES, huge_page_reserved
from pagedllm.worker.huge_page_stash import HugePageStash

linux = pytest.mark.skipif(not os.path.exists("/proc/self/smaps"), reason="Linux's /proc")


def mapping_of(address: int) -> dict | None:
    """The /proc/self/smaps entry (range and AnonHugePages bytes) holding `address`."""
    entry = None
    with open("/proc/self/smaps") as f:
        for line in f:
            fields = line.split()
            if "-" in fields[0] and not fields[0].endswith(":"):
                start, end = (int(x, 16) for x in fields[0].split("-"))
                entry = {"start": start, "end": end} if start <= address < end else None
                if entry is None and start > address:
                    return None
            elif entry is not None and fields[0] == "AnonHugePages:":
                entry["huge"] = int(fields[1]) * 1024
                return entry
    return entry


def wait_committed(stash: HugePageStash, num_pages: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while stash.committed < num_pages:
        assert time.monotonic() < deadline, "the stash did not commit its pages"
        time.sleep(0.01)


@linux
def test_stashed_pages_move_into_a_pool_as_zeroed_huge_pages_and_the_rest_is_unmapped():
    stash = HugePageStash(4 * HUGE_PAGE_BYTES)
    wait_committed(stash, 4)
    stash_base = stash.base
    pool = huge_page_reserved((8 * HUGE_PAGE_BYTES,), torch.uint8, advise=False)
    base = pool.data_ptr()
    destinations = [base + 5 * HUGE_PAGE_BYTES, base + HUGE_PAGE_BYTES, base]
    assert stash.move_into(destinations) == 3
    # The stash's fourth page (not moved) is unmapped (looked at before anything else maps
    # memory that could land there).
    assert mapping_of(stash_base + 3 * HUGE_PAGE_BYTES) is None
    assert int(pool.count_nonzero()) == 0
    pool.fill_(7)
    assert int(pool.sum()) == 7 * pool.numel()
    if mapping_of(base + HUGE_PAGE_BYTES)["huge"]:  # THP here: the moved pages stay huge
        for destination in destinations:
            assert mapping_of(destination)["huge"] >= HUGE_PAGE_BYTES
        assert mapping_of(base + 2 * HUGE_PAGE_BYTES)["huge"] == 0  # written in small pages
    assert stash.move_into([base + 6 * HUGE_PAGE_BYTES]) == 0  # nothing left to move


@linux
def test_an_unclaimed_stash_is_unmapped_after_a_while():
    stash = HugePageStash(2 * HUGE_PAGE_BYTES, keep_seconds=0.05)
    wait_committed(stash, 2)
    stash_base = stash.base
    stash._thread.join(timeout=30)
    assert not stash._thread.is_alive()
    assert mapping_of(stash_base) is None and stash.committed == 0


def test_pool_pages_come_in_block_order_across_layers_each_page_once():
    # Two layers whose key halves are 2.5 huge pages: the value half starts mid-page.
    block = HUGE_PAGE_BYTES // 4  # 4 blocks per page
    caches = [huge_page_reserved((2, 10, block), torch.uint8, advise=False) for _ in range(2)]
    pages = _pool_pages_in_order(caches)
    assert len(pages) == len(set(pages)) == 2 * 5
    first = [c.data_ptr() for c in caches]
    # Page 0 of each half first (the value half's first page is the one its blocks 0-1 are
    # in, the key half's third), then page 1 of each, and so on.
    assert pages[:4] == [first[0], first[0] + 2 * HUGE_PAGE_BYTES,
                         first[1], first[1] + 2 * HUGE_PAGE_BYTES]
    assert pages[4:8] == [first[0] + HUGE_PAGE_BYTES, first[0] + 3 * HUGE_PAGE_BYTES,
                          first[1] + HUGE_PAGE_BYTES, first[1] + 3 * HUGE_PAGE_BYTES]
    assert sorted(pages[8:]) == sorted([first[0] + 4 * HUGE_PAGE_BYTES,
                                        first[1] + 4 * HUGE_PAGE_BYTES])
    for page in pages:  # whole pages inside a layer's pool
        assert any(c.data_ptr() <= page and page + HUGE_PAGE_BYTES <= c.data_ptr() + c.numel()
                   for c in caches)


@linux
def test_the_first_ahead_pool_takes_the_stash_and_the_next_one_nothing(monkeypatch):
    from pagedllm.attention.torch_paged import TorchPagedAttention
    from pagedllm.worker.cache_engine import CacheEngine, KVCacheSpec

    monkeypatch.setenv(cache_engine.KV_POOL_COMMIT_ENV, "ahead")
    stash = HugePageStash(4 * HUGE_PAGE_BYTES)
    wait_committed(stash, 4)
    monkeypatch.setattr(cache_engine, "_stash", stash)
    # 2 layers, blocks of 16 x 2 heads x 64 bf16 = 4 KiB a half: 1024 blocks = 2 pages a half.
    spec = KVCacheSpec(num_layers=2, num_kv_heads=2, head_size=64, block_size=16,
                       dtype=torch.bfloat16)
    backend = TorchPagedAttention(2, 2, 64, 0.125, 16)
    engine = CacheEngine(spec, 1024, backend, torch.device("cpu"))
    try:
        assert engine.prefaulted_pages == 4
        assert all(int(c.count_nonzero()) == 0 for c in engine.kv_caches)
        if mapping_of(engine.kv_caches[0].data_ptr())["huge"]:
            for cache in engine.kv_caches:  # block 0 of each key and value half
                for half in range(2):
                    assert mapping_of(cache[half, 0].data_ptr())["huge"] >= HUGE_PAGE_BYTES
        other = CacheEngine(spec, 1024, backend, torch.device("cpu"))
        assert other.prefaulted_pages == 0
        other.committer.stop(timeout=10)
    finally:
        engine.committer.stop(timeout=10)


@linux
def test_a_forked_child_takes_no_stash_and_unmaps_its_copy(monkeypatch):
    stash = HugePageStash(2 * HUGE_PAGE_BYTES)
    wait_committed(stash, 2)
    monkeypatch.setattr(cache_engine, "_stash", stash)
    base = stash.base
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report and leave without running pytest's exit
        ok = cache_engine._take_kv_prefault() is None and mapping_of(base) is None
        os.write(write, b"1" if ok else b"0")
        os._exit(0)
    os.close(write)
    assert os.read(read, 1) == b"1"
    os.waitpid(pid, 0)
    assert cache_engine._stash is stash and mapping_of(base) is not None  # the parent's
    stash.release()
