"""The CPU worker's malloc settings: freed step buffers are reused, not faulted in again."""

from __future__ import annotations

import ctypes
import ctypes.util
import platform
import resource

import pytest

from pagedllm.worker.host_memory import M_MMAP_THRESHOLD, M_TRIM_THRESHOLD, keep_freed_buffers

needs_glibc = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's mallopt")


def huge_pages_always() -> bool:
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return "[always]" in f.read()
    except OSError:
        return False


# With transparent huge pages always on, a fresh mapping faults in 2 MB at a time, and the
# fault counts below no longer tell reuse from remapping.
counts_4k_faults = pytest.mark.skipif(huge_pages_always(), reason="THP 'always' on this kernel")

BUFFER_BYTES = 12 << 20  # a 2048-token step's MLP output in bf16


def page_faults_of_step_buffers(steps: int = 8) -> int:
    """Minor page faults while a buffer is malloc'ed, written and freed once per 'step'."""
    libc = glibc()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(steps):
        buffer = libc.malloc(BUFFER_BYTES)
        assert buffer
        ctypes.memset(buffer, 1, BUFFER_BYTES)
        libc.free(buffer)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


def glibc() -> ctypes.CDLL:
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = (ctypes.c_size_t,)
    libc.free.argtypes = (ctypes.c_void_p,)
    return libc


def use_glibc_starting_thresholds() -> None:
    """glibc's starting thresholds, fixed: every buffer of this size is its own mapping."""
    libc = glibc()
    assert libc.mallopt(M_MMAP_THRESHOLD, 128 << 10) and libc.mallopt(M_TRIM_THRESHOLD, 128 << 10)


@needs_glibc
@counts_4k_faults
def test_freed_step_buffers_are_reused_without_page_faults():
    use_glibc_starting_thresholds()
    faults_by_default = page_faults_of_step_buffers()
    assert keep_freed_buffers()
    page_faults_of_step_buffers(1)  # the heap grows once
    faults_kept = page_faults_of_step_buffers()
    pages_per_step = BUFFER_BYTES // resource.getpagesize()
    assert faults_by_default >= 4 * pages_per_step  # each step faulted its pages in again
    assert faults_kept < pages_per_step // 10


@needs_glibc
@counts_4k_faults
def test_the_cpu_worker_applies_them(tiny_llama_factory):
    from pagedllm import LLM, SamplingParams

    use_glibc_starting_thresholds()
    llm = LLM(str(tiny_llama_factory()), num_kv_blocks=16)
    page_faults_of_step_buffers(1)
    assert page_faults_of_step_buffers() < BUFFER_BYTES // resource.getpagesize() // 10
    out = llm.generate({"prompt_token_ids": [5, 6, 7]}, SamplingParams(max_tokens=3), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 3
