"""Host memory policy of a CPU worker: glibc malloc settings that let it reuse its step-sized
activation buffers, and buffers in transparent huge pages for the weights and the KV cache.

A CPU forward allocates and frees buffers of several MB per op (a 2048-token step's MLP output
is 12 MB). With glibc's defaults such a buffer is either its own mmap or sits at the top of the
heap, and freeing it gives the pages back to the kernel; the next step then takes a fresh page
fault for every 4 KB it touches. Measured on SmolLM2 (bf16, 64 x 128-token prefill): 430-770K
minor faults per batch; with the settings below 10-25K, and the prefill 6% faster on average
over 10 interleaved runs (decode steps even: they allocate little).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import logging
import math
import mmap
from collections.abc import Sequence

import torch

from pagedllm.worker.page_mapping import HUGE_PAGE_BYTES, huge_page_mapping

logger = logging.getLogger(__name__)

# mallopt parameter numbers from glibc's malloc.h.
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3

# Buffers up to this size come from the heap and are reused there (glibc's default starts at
# 128 KB and grows only as far as the largest freed mapping).
MMAP_THRESHOLD_BYTES = 256 << 20
# Free memory at the heap's top is kept up to this much instead of being given back.
TRIM_THRESHOLD_BYTES = 1 << 30


def keep_freed_buffers() -> bool:
    """Make glibc keep freed activation buffers for reuse; False where libc is not glibc.

    Call it once the weights and the KV cache are allocated: those long-lived tensors keep
    their own mappings, and only the per-step buffers afterwards are served from the heap.
    """
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl, macOS: no mallopt
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    applied = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)) and bool(
        mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)
    )
    if not applied:
        logger.info("malloc thresholds not set: this libc refused mallopt")
    return applied


# Transparent huge pages. Every decode step streams all packed weights and each sequence's
# KV blocks; with 4 KB pages that is a TLB miss (a page walk) per 4 KB read. Measured on
# SmolLM2 bf16, two engines in one process taking turns at steps (weights and KV cache in 2 MB
# pages or not): decode steps of 1 sequence 6% faster, 12 sequences 5%, 64 sequences 1% (those
# are bound by arithmetic, not by reading); the projections alone at 1 row 11% faster.
# (The mapping itself is worker/page_mapping.py's, which imports no torch.)


def huge_page_buffer(nbytes: int, advise: bool = True) -> torch.Tensor:
    """A zero-filled uint8 CPU tensor of nbytes, 2 MB aligned, that the kernel may back with
    transparent huge pages (page_mapping.huge_page_mapping; the tensor keeps the mapping alive).

    Its pages are faulted in (zeroed, in 2 MB pages) when first written. `advise=False` gives
    no advice: under THP's `madvise` mode the pages fault in 4 KB at a time (collapse_pages
    makes 2 MB pages of them later), aligned all the same.
    """
    if nbytes == 0:
        return torch.zeros(0, dtype=torch.uint8)
    mapping, start = huge_page_mapping(nbytes, advise)
    return torch.frombuffer(mapping, dtype=torch.uint8)[start:start + nbytes]


def huge_page_zeros(shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
    """torch.zeros(shape, dtype=dtype) in a huge_page_buffer, written once so that its pages
    are in place before the first step.

    NOTE: left to fault in during steps (as blocks are first used), the KV cache cost the
    `fixed` throughput workload 6% here (four alternating pairs of runs: 241 vs 257 tok/s on
    average, from -2% to +14% per pair); writing it at start-up costs 0.2-1.5 s per 2 GiB.
    """
    return huge_page_reserved(shape, dtype).zero_()


def huge_page_reserved(shape: Sequence[int], dtype: torch.dtype,
                       advise: bool = True) -> torch.Tensor:
    """A zero tensor of `shape` in a huge_page_buffer (`advise`: see there), reserved but not
    written: its pages are committed (faulted in, zeroed by the kernel) when first written, so
    resident memory follows what is used. It reads as zeros before that (the kernel's zero
    page)."""
    nbytes = math.prod(shape) * dtype.itemsize
    return huge_page_buffer(nbytes, advise).view(dtype).view(tuple(shape))


# madvise(2) advice that lets the kernel back a range with transparent huge pages where THP is
# in `madvise` mode (mmap.MADV_HUGEPAGE, spelled out for a ctypes call on an address).
MADV_HUGEPAGE = 14
# madvise(2) advice that faults pages in as a write would, without writing (Linux 5.14+; not in
# Python 3.11's mmap module).
MADV_POPULATE_WRITE = 23
# madvise(2) advice that moves the present 4 KB pages of each whole 2 MB-aligned stretch of a
# range into one huge page, in place and with their contents (Linux 6.1+).
MADV_COLLAPSE = 25

_madvise = None


_libc_handle = None


def _libc():
    global _libc_handle
    if _libc_handle is None:
        name = ctypes.util.find_library("c")
        _libc_handle = ctypes.CDLL(name, use_errno=True) if name else False
    return _libc_handle


def libc_function(name: str, restype, argtypes):
    """The libc function `name` with its ctypes restype and argtypes set; None where the libc
    or the function is missing."""
    libc = _libc()
    function = getattr(libc, name, None) if libc else None
    if function is not None:
        function.restype = restype
        function.argtypes = argtypes
    return function


def _libc_madvise():
    global _madvise
    if _madvise is None:
        libc = _libc()
        madvise = getattr(libc, "madvise", None) if libc else None
        if madvise is not None:
            madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
            madvise.restype = ctypes.c_int
        _madvise = madvise or False
    return _madvise


def commit_pages(address: int, nbytes: int) -> bool:
    """Commits the pages of [address, address + nbytes) (rounded out to whole pages) as a first
    write would, without writing: pages not yet present are faulted in zeroed, pages present
    keep what they hold, so it is safe on memory another thread is writing. The GIL is released
    meanwhile (a ctypes call). False where the kernel (before 5.14) or the libc cannot."""
    madvise = _libc_madvise()
    if not madvise or nbytes <= 0:
        return False
    start = address - address % mmap.PAGESIZE
    return madvise(start, address + nbytes - start, MADV_POPULATE_WRITE) == 0


def advise_huge_pages(address: int, nbytes: int) -> bool:
    """Lets pages of [address, address + nbytes) (rounded out to whole pages) that are faulted in
    from now on be transparent huge pages, as huge_page_buffer's advice does (pages present keep
    their size). False where the kernel or the libc refuses."""
    madvise = _libc_madvise()
    if not madvise or nbytes <= 0:
        return False
    start = address - address % mmap.PAGESIZE
    return madvise(start, address + nbytes - start, MADV_HUGEPAGE) == 0


def page_present(address: int) -> bool:
    """Whether the page holding `address` is in memory (mincore(2); reading it to find out would
    map the zero page there). False where the libc cannot tell."""
    libc = _libc()
    mincore = getattr(libc, "mincore", None) if libc else None
    if mincore is None:
        return False
    start = address - address % mmap.PAGESIZE
    vec = ctypes.c_ubyte()
    if mincore(ctypes.c_void_p(start), ctypes.c_size_t(mmap.PAGESIZE), ctypes.byref(vec)):
        return False
    return bool(vec.value & 1)


def collapse_pages(address: int, nbytes: int) -> int:
    """Makes one transparent huge page of each 2 MB-aligned 2 MB stretch inside
    [address, address + nbytes), its contents kept (pages not yet present in a stretch that has
    some are committed as zeros), whatever THP's sysfs mode; safe on memory another thread is
    writing. 0 on success, else the errno (EINVAL: the kernel (before 6.1) or the libc cannot,
    or nothing of a stretch is present; EAGAIN, ENOMEM: no huge page to be had now)."""
    madvise = _libc_madvise()
    if not madvise:
        return errno.EINVAL
    start = -(-address // HUGE_PAGE_BYTES) * HUGE_PAGE_BYTES
    end = (address + nbytes) // HUGE_PAGE_BYTES * HUGE_PAGE_BYTES
    if end <= start:
        return 0
    if madvise(start, end - start, MADV_COLLAPSE) == 0:
        return 0
    return ctypes.get_errno() or errno.EINVAL


class HugePageArena:
    """Hands out tensors carved from a few large huge_page_buffers (for the packed weights: most
    are too small to fill a 2 MB page alone). Bump allocation, 64-byte aligned; a request that
    does not fit the room left in any buffer gets a new one of at least `chunk_bytes`. The
    tensors start zeroed, like the buffers."""

    ALIGN = 64

    def __init__(self, chunk_bytes: int = 64 << 20) -> None:
        self.chunk_bytes = chunk_bytes
        self.chunks: list[torch.Tensor] = []
        self.used: list[int] = []

    def empty(self, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        """A zeroed tensor of `shape` and `dtype` (contiguous) in the arena."""
        nbytes = math.prod(shape) * dtype.itemsize
        for i, chunk in enumerate(self.chunks):
            if self.used[i] + nbytes <= chunk.numel():
                break
        else:
            size = max(self.chunk_bytes, -(-nbytes // HUGE_PAGE_BYTES) * HUGE_PAGE_BYTES)
            self.chunks.append(huge_page_buffer(size))
            self.used.append(0)
            i = len(self.chunks) - 1
        offset = self.used[i]
        self.used[i] = -(-(offset + nbytes) // self.ALIGN) * self.ALIGN
        return self.chunks[i][offset:offset + nbytes].view(dtype).view(tuple(shape))
