"""The CPU worker's host memory: freed step buffers are reused, not faulted in again; weights
and KV cache sit in memory advised for transparent huge pages."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest
import torch

from pagedllm.worker.host_memory import (
    HUGE_PAGE_BYTES,
    HugePageArena,
    advise_huge_pages,
    huge_page_buffer,
    huge_page_zeros,
    page_present,
)

needs_glibc = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's mallopt")

BUFFER_BYTES = 12 << 20  # a 2048-token step's MLP output in bf16

# Minor page faults of 8 'steps' that each malloc, write and free one buffer, in a fresh
# process: in this one, earlier tests leave free heap that would serve the buffer anyway.
PROBE = """
import ctypes, ctypes.util, resource, sys
libc = ctypes.CDLL(ctypes.util.find_library("c"))
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = (ctypes.c_size_t,)
libc.free.argtypes = (ctypes.c_void_p,)
# glibc's starting thresholds, held fixed: a buffer of this size is a mapping of its own.
assert libc.mallopt(-3, 128 << 10) and libc.mallopt(-1, 128 << 10)  # M_MMAP/M_TRIM_THRESHOLD
if sys.argv[1] == "kept":
    from pagedllm.worker.host_memory import keep_freed_buffers
    assert keep_freed_buffers()
size = int(sys.argv[2])
def step():
    buffer = libc.malloc(size)
    assert buffer
    ctypes.memset(buffer, 1, size)
    libc.free(buffer)
step()  # the first one faults its pages in either way
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(8):
    step()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def page_faults_of_steps(mode: str) -> int:
    done = subprocess.run([sys.executable, "-c", PROBE, mode, str(BUFFER_BYTES)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return int(done.stdout)


def huge_pages_always() -> bool:
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return "[always]" in f.read()
    except OSError:
        return False


@needs_glibc
@pytest.mark.skipif(huge_pages_always(), reason="THP 'always': mappings fault 2 MB at a time")
def test_freed_step_buffers_are_reused_without_page_faults():
    pages_per_step = BUFFER_BYTES // 4096
    assert page_faults_of_steps("fixed") >= 4 * pages_per_step  # each step faulted them again
    assert page_faults_of_steps("kept") < pages_per_step // 10


def test_the_cpu_worker_applies_them(tiny_llama_factory, monkeypatch):
    from pagedllm import LLM, SamplingParams
    from pagedllm.worker import worker

    calls = []
    real = worker.keep_freed_buffers
    monkeypatch.setattr(worker, "keep_freed_buffers", lambda: calls.append(1) or real())
    llm = LLM(str(tiny_llama_factory()), num_kv_blocks=16)
    assert calls == [1]
    out = llm.generate({"prompt_token_ids": [5, 6, 7]}, SamplingParams(max_tokens=3), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 3


needs_thp = pytest.mark.skipif(not os.path.exists("/sys/kernel/mm/transparent_hugepage/enabled"),
                               reason="no transparent huge pages in this kernel")


def vm_flags(address: int) -> list[str]:
    """The permissions (e.g. rw-p) and VmFlags of this process's mapping that holds `address`
    (/proc/self/smaps)."""
    inside, perms = False, ""
    with open("/proc/self/smaps") as f:
        for line in f:
            fields = line.split()
            if "-" in fields[0] and not fields[0].endswith(":"):
                start, end = (int(x, 16) for x in fields[0].split("-"))
                inside, perms = start <= address < end, fields[1]
            elif inside and fields[0] == "VmFlags:":
                return [perms] + fields[1:]
    raise AssertionError(f"no mapping holds {address:#x}")


def advised(address: int) -> bool:
    """Private anonymous memory (shared memory is shmem, with its own huge-page switch) under
    MADV_HUGEPAGE."""
    flags = vm_flags(address)
    return flags[0].endswith("p") and "hg" in flags


@needs_thp
def test_a_huge_page_buffer_is_aligned_and_advised_before_it_is_written():
    buffer = huge_page_buffer(5 << 20)
    assert buffer.dtype == torch.uint8 and buffer.numel() == 5 << 20
    assert buffer.data_ptr() % HUGE_PAGE_BYTES == 0
    assert advised(buffer.data_ptr()) and advised(buffer.data_ptr() + buffer.numel() - 1)


@needs_thp
def test_advice_given_later_covers_the_range_asked_only():
    buffer = huge_page_buffer(6 << 20, advise=False)
    assert not advised(buffer.data_ptr())
    assert advise_huge_pages(buffer.data_ptr() + HUGE_PAGE_BYTES, HUGE_PAGE_BYTES)
    assert not advised(buffer.data_ptr())
    assert advised(buffer.data_ptr() + HUGE_PAGE_BYTES)
    assert advised(buffer.data_ptr() + 2 * HUGE_PAGE_BYTES - 1)
    assert not advised(buffer.data_ptr() + 2 * HUGE_PAGE_BYTES)


@pytest.mark.skipif(not os.path.exists("/proc/self/smaps"), reason="Linux's mincore")
def test_a_page_is_present_once_written_and_not_when_only_reserved():
    buffer = huge_page_buffer(4 << 20, advise=False)
    assert not page_present(buffer.data_ptr() + 8192)
    buffer[8192] = 1
    assert page_present(buffer.data_ptr() + 8192) and not page_present(buffer.data_ptr() + (3 << 20))


def resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_huge_page_zeros_are_zeros_of_the_shape_and_dtype():
    zeros = huge_page_zeros((2, 3, 5), torch.bfloat16)
    assert zeros.shape == (2, 3, 5) and zeros.dtype == torch.bfloat16 and zeros.is_contiguous()
    assert torch.equal(zeros, torch.zeros(2, 3, 5, dtype=torch.bfloat16))
    assert huge_page_zeros((0, 4), torch.float32).shape == (0, 4)


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="Linux's /proc")
def test_buffers_are_zero_unwritten_and_zeros_are_in_place_before_use():
    before = resident_bytes()
    buffer = huge_page_buffer(256 << 20)  # zero without a write, and no memory yet
    assert resident_bytes() - before < 16 << 20
    buffer[: 64 << 20].fill_(1)
    assert resident_bytes() - before >= 64 << 20
    assert int(buffer[64 << 20:].count_nonzero()) == 0
    del buffer
    before = resident_bytes()
    cache = huge_page_zeros((128 << 20,), torch.uint8)  # a KV cache: faulted in now, not in steps
    assert resident_bytes() - before >= 128 << 20
    assert int(cache.count_nonzero()) == 0


def test_the_arena_hands_out_aligned_disjoint_tensors_first_fit():
    arena = HugePageArena(chunk_bytes=4 << 20)
    small = [arena.empty((3, 7), torch.float32) for _ in range(4)]
    big = arena.empty((5 << 20,), torch.uint8)  # more than a chunk: a chunk of its own
    after = arena.empty((100,), torch.bfloat16)  # fits the first chunk's room
    assert len(arena.chunks) == 2 and arena.chunks[1].numel() == 6 << 20
    tensors = small + [big, after]
    assert all(t.data_ptr() % HugePageArena.ALIGN == 0 and t.is_contiguous() for t in tensors)
    assert after.untyped_storage().data_ptr() == small[0].untyped_storage().data_ptr()
    spans = sorted((t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()) for t in tensors)
    assert all(end <= start for (_, end), (start, _) in zip(spans, spans[1:]))
    for i, t in enumerate(tensors):
        t.fill_(i + 1)
    assert all(bool((t == i + 1).all()) for i, t in enumerate(tensors))  # nothing overwritten


@needs_thp
def test_the_cpu_worker_puts_packed_weights_and_kv_cache_in_huge_pages(tiny_llama_factory,
                                                                      monkeypatch):
    from pagedllm import LLM, SamplingParams
    from pagedllm.worker.cache_engine import KV_POOL_COMMIT_ENV

    # A pool written at start is advised; one committed ahead is collapsed into huge pages
    # once idle instead (tests/worker/test_kv_pool_commit.py).
    monkeypatch.setenv(KV_POOL_COMMIT_ENV, "start")
    llm = LLM(str(tiny_llama_factory()), num_kv_blocks=16)
    worker = llm.llm_engine.worker
    streamed = [t for w in worker.model.packed_weights() for t in (w.panels, w.plain)
                if t is not None]
    assert streamed and all(advised(t.data_ptr()) for t in streamed)
    assert all(advised(c.data_ptr()) for c in worker.cache_engine.kv_caches)
    out = llm.generate({"prompt_token_ids": [5, 6, 7]}, SamplingParams(max_tokens=3), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 3
