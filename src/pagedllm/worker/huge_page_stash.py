"""The opt-in start-up prefault of the host KV pool's first huge pages (HugePageStash): a thread
commits 2 MiB pages before the buffer that takes them exists, and the buffer takes them by
moving them (mremap, no copy). cache_engine.start_kv_prefault starts it."""

from __future__ import annotations

import ctypes
import mmap
import threading

from pagedllm.worker.host_memory import (
    HUGE_PAGE_BYTES,
    advise_huge_pages,
    commit_pages,
    libc_function,
)

# mremap(2) flags (linux/mman.h).
MREMAP_MAYMOVE = 1
MREMAP_FIXED = 2
_PROT_READ_WRITE = 0x3
_MAP_FAILED = ctypes.c_void_p(-1).value


def move_pages(source: int, destination: int, nbytes: int) -> bool:
    """Moves the pages of [source, source + nbytes) to `destination` (mremap with MREMAP_FIXED:
    page tables moved, nothing copied; a 2 MiB-aligned huge page stays one, PMD-mapped), what
    was mapped at the destination unmapped first. Both ranges page aligned, inside private
    anonymous mappings. False where the kernel or the libc refuses (the source then stays)."""
    mremap = libc_function("mremap", ctypes.c_void_p, (
        ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t, ctypes.c_int, ctypes.c_void_p))
    if mremap is None:
        return False
    moved = mremap(source, nbytes, nbytes, MREMAP_MAYMOVE | MREMAP_FIXED, destination)
    return moved == destination


class HugePageStash:
    """Huge pages committed ahead of the buffer that will hold them: a thread maps `nbytes`
    (private, anonymous, 2 MiB aligned, MADV_HUGEPAGE) and commits it one 2 MiB page at a
    time (MADV_POPULATE_WRITE: a huge page each where the host has them, zeroed), while the
    process does other work (a start's imports and weights read leave the second core idle);
    `move_into` then moves the pages committed so far to where a buffer needs them (mremap:
    no copy, still huge pages) and unmaps the rest.

    On a VM whose free huge pages go back to the host a huge page costs ~5 ms of system time to
    commit (kv_commit.py): 128 pages are ~0.6 s of a core. NOTE: not free for the thread it runs
    beside: each MADV_POPULATE_WRITE holds the address space's lock for its page's ~5 ms, and
    that thread's own mmaps (a start's imports make thousands) wait for it (cache_engine.py's
    measurement: `LLM()` ready 1.0 s later with 256 MiB).
    Pages not claimed within `keep_seconds` of being committed are unmapped. NOTE: the thread
    calls no torch op (ctypes only) and is stopped before the interpreter finalizes
    (kv_commit's atexit hook calls `stop`)."""

    def __init__(self, nbytes: int, keep_seconds: float = 60.0) -> None:
        self.num_pages = max(0, nbytes // HUGE_PAGE_BYTES)
        self.keep_seconds = keep_seconds
        self.committed = 0  # pages [0, committed) are in place
        self.base = 0  # the first page's address; 0: nothing mapped (or unmapped since)
        self._mapping = (0, 0)  # what to munmap: address, length
        self._stop = threading.Event()
        self._claim = threading.Lock()  # held by the thread while it commits or unmaps
        self._thread = threading.Thread(target=self._run, name="pagedllm-huge-page-stash",
                                        daemon=True)
        self._thread.start()

    def _run(self) -> None:
        with self._claim:
            if not self._map():
                self._unmap()
                return
            for page in range(self.num_pages):
                if self._stop.is_set():
                    return
                if not commit_pages(self.base + page * HUGE_PAGE_BYTES, HUGE_PAGE_BYTES):
                    return
                self.committed = page + 1
        if not self._stop.wait(self.keep_seconds):
            self.release()

    def _map(self) -> bool:
        mmap_ = libc_function("mmap", ctypes.c_void_p, (
            ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
            ctypes.c_long))
        if mmap_ is None or not self.num_pages:
            return False
        length = (self.num_pages + 1) * HUGE_PAGE_BYTES
        private = getattr(mmap, "MAP_PRIVATE", 0) | getattr(mmap, "MAP_ANONYMOUS", 0)
        address = mmap_(None, length, _PROT_READ_WRITE, private, -1, 0)
        if address in (None, _MAP_FAILED):
            return False
        self._mapping = (address, length)
        self.base = address + (-address % HUGE_PAGE_BYTES)
        return advise_huge_pages(self.base, self.num_pages * HUGE_PAGE_BYTES)

    def stop(self, timeout: float | None = None) -> None:
        """Stops committing (between two pages) and waits up to `timeout` for the thread's
        current page."""
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def move_into(self, destinations: list[int]) -> int:
        """Stops the thread, moves committed pages to `destinations` (2 MiB-aligned addresses
        inside private anonymous mappings, in order, as far as there are pages), unmaps the rest
        of the stash and returns how many pages moved."""
        self._stop.set()
        with self._claim:
            moved = 0
            if self.base:
                for destination in destinations[:self.committed]:
                    if not move_pages(self.base + moved * HUGE_PAGE_BYTES, destination,
                                      HUGE_PAGE_BYTES):
                        break
                    moved += 1
            self._unmap(moved)
        return moved

    def forget_in_child(self) -> None:
        """In a child made by fork (which has no thread; its lock may have been held at the
        fork): unmaps the child's copy of the pages."""
        self._stop.set()
        self._claim = threading.Lock()
        self._unmap()

    def release(self) -> None:
        """Unmaps the stash's pages (none move after this)."""
        self._stop.set()
        with self._claim:
            self._unmap()

    def _unmap(self, moved: int = 0) -> None:
        """Unmaps what is left of the mapping past the first `moved` pages. NOTE: only that:
        the moved pages' old addresses are free address space, which another thread may have
        mapped since."""
        address, length = self._mapping
        munmap = libc_function("munmap", ctypes.c_int, (ctypes.c_void_p, ctypes.c_size_t))
        if address and munmap is not None:
            rest = self.base + moved * HUGE_PAGE_BYTES
            if self.base > address:
                munmap(address, self.base - address)
            if address + length > rest:
                munmap(rest, address + length - rest)
        self._mapping = (0, 0)
        self.base = 0
        self.committed = 0
