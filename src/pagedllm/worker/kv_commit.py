"""Commits a reserved host KV pool a little ahead of use, on a background thread, so that
resident memory follows the blocks in use and still no step faults a page in.

The block pool hands out never-used blocks lowest id first, and only after freed ones
(core/block_pool.py), so the written part of the pool grows from block 0 up, to the peak in use. The
thread finds the highest block written so far (a written block's first key slot is not all
zero bits; written keys never are in practice, and a block missed only costs the page faults
this avoids) and keeps the next `blocks_ahead` blocks of every layer committed
(MADV_POPULATE_WRITE: faulted in zeroed, without writing, so racing a step's writes is safe).

Pages are committed 4 KiB at a time (the pool has no huge-page advice): on this kind of host
(a VM whose free huge pages go back to the hypervisor) a 2 MiB page took 2.4 ms of system time
to fault in against 0.3 ms for its 512 small pages, and the thread's time is taken from the
steps' cores. Once the process is idle (its other threads used under IDLE_CPU_SHARE of a core
for IDLE_SECONDS) the thread commits further ahead (`idle_blocks_ahead`) and makes 2 MiB pages
of what is committed (MADV_COLLAPSE, in place, one page per call, looking again between calls
so that a new request finds the cores free), so the blocks of a long-lived server are read
through huge pages like the weights.

With PAGEDLLM_KV_COMMIT_PAGES=huge the pool is advised MADV_HUGEPAGE instead, no reserve is
committed at start and nothing before the first block is written (or the process is idle); from
then on the thread commits whole 2 MiB pages of every layer's keys and values ahead (a step that
gets there first faults the page in, huge too). Each page then costs its 2 MiB fault once per
process (2.4-5 ms of system time here: free huge pages are the ones handed back to the host)
instead of the attention kernel's page walks at every step (decode attention over 30 layers'
pools in 4 KiB pages: 1.41x the time in 2 MiB pages, best of 40 under load).

It stops once the whole pool is committed and collapsed, when its cache engine is collected, or
at interpreter exit (an atexit hook stops and joins it). NOTE: the thread calls no torch op: every
address is computed up front as an int and the probe of written blocks is a numpy view made in
the constructor. A daemon thread inside a torch op (which releases the GIL in C++) that takes
the GIL back while the interpreter finalizes is ended by pthread_exit, whose unwinding through
a noexcept C++ frame aborts the process ("terminate called without an active exception").
"""

from __future__ import annotations

import atexit
import errno
import logging
import os
import resource
import threading
import time
import weakref

import numpy as np
import torch

from pagedllm.worker.host_memory import (
    HUGE_PAGE_BYTES,
    advise_huge_pages,
    collapse_pages,
    commit_pages,
    page_present,
)

logger = logging.getLogger(__name__)

# How far ahead of the highest written block the pool is kept committed, in bytes of all layers'
# blocks: a few prefill steps' worth (a 2048-token step takes 128 blocks of 16 tokens; SmolLM2's
# blocks are 360 KiB, so 128 MiB is 364 blocks).
COMMIT_AHEAD_BYTES = 128 << 20
# How far ahead it is committed while the process is idle, so that the next burst of requests
# starts on pages in place (and in huge pages).
IDLE_COMMIT_AHEAD_BYTES = 256 << 20
# At idle it commits this much (all layers) per call, looking again in between.
IDLE_COMMIT_STEP_BYTES = 16 << 20
# How often the thread looks for newly written blocks; it waits up to MAX_POLL_SECONDS (doubling)
# while nothing changes.
POLL_SECONDS = 0.005
MAX_POLL_SECONDS = 0.05
# The process is idle when its other threads used less than this share of one core over the
# last IDLE_SECONDS.
IDLE_CPU_SHARE = 0.05
IDLE_SECONDS = 0.5

# Page size of what the thread commits past the start reserve: `small` (4 KiB) or `huge` (whole
# 2 MiB pages of every layer's keys and values, the pool advised MADV_HUGEPAGE past the reserve).
COMMIT_PAGES_ENV = "PAGEDLLM_KV_COMMIT_PAGES"

_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_THREAD = getattr(resource, "RUSAGE_THREAD", None)
# How long the atexit hook waits for each running thread (it stops between two madvise calls).
EXIT_JOIN_SECONDS = 2.0

# The running committers' (stop event, thread), stopped and joined at interpreter exit.
_RUNNING: set[tuple[threading.Event, threading.Thread]] = set()
_RUNNING_LOCK = threading.Lock()


class KVPoolCommitter:
    """Keeps blocks [0, committed) of every layer's host pool committed, `blocks_ahead` past
    the highest block written, and collapses them into huge pages at idle (see the module's
    docstring). `caches` are the layers' pools, each contiguous [2 (key, value), num_blocks,
    ...] on the CPU, the pool 2 MiB aligned (host_memory.huge_page_reserved)."""

    def __init__(self, caches: list[torch.Tensor], blocks_ahead: int,
                 poll_seconds: float = POLL_SECONDS, idle_blocks_ahead: int | None = None,
                 idle_seconds: float = IDLE_SECONDS, collapse: bool = True,
                 commit_now: int = 0, huge_pages: bool | None = None) -> None:
        """`commit_now`: blocks [0, commit_now) are committed before this returns (what an idle
        engine holds anyway: a fresh engine's first batch then commits that much less while it
        runs)."""
        self.caches = caches
        self.num_blocks = caches[0].shape[1]
        self.blocks_ahead = max(1, blocks_ahead)
        self.idle_blocks_ahead = max(self.blocks_ahead, idle_blocks_ahead or 0)
        self.block_bytes = caches[0][0, 0].numel() * caches[0].element_size()
        self.probe_elements = caches[0].shape[-1]  # one head of the first slot
        # Every layer's key and value half: its first block's address and its layer's end (ints,
        # so that the thread calls no torch op: see the module's docstring).
        self._bases = [cache[half].data_ptr() for cache in caches for half in range(cache.shape[0])]
        self._layer_ends = [cache.data_ptr() + cache.numel() * cache.element_size()
                            for cache in caches for _ in range(cache.shape[0])]
        # The first layer's key blocks' first head, as integer bits (numpy: no torch op in the
        # thread; bits, not values: -0.0 is written too).
        keys = caches[0][0].view(_BITS[caches[0].element_size()])
        self._probe = keys.reshape(self.num_blocks, -1)[:, :self.probe_elements].numpy()
        self._idle_step_blocks = max(
            1, IDLE_COMMIT_STEP_BYTES // (self.block_bytes * caches[0].shape[0] * len(caches)))
        self.poll_seconds = poll_seconds
        self.idle_seconds = idle_seconds
        self.written = 0  # blocks [0, written) hold the highest block written so far
        self.committed = 0
        self.failed = False
        # Huge pages: the next 2 MiB page to collapse, as (page index within a half, position
        # in `_bases`); every half's pages [0, page) are done. None once collapsing stopped.
        self._collapse_at: tuple[int, int] | None = (0, 0) if collapse else None
        self.num_collapsed = 0  # 2 MiB pages made by this thread
        # Minor page faults taken by this thread's commits (the engine's own are the process's
        # less these): benchmarks check that the steps take none.
        self.page_faults = 0
        self._busy_at = time.monotonic()  # when the other threads were last seen busy
        self._cpu_seen = (time.monotonic(), _other_threads_cpu())
        if huge_pages is None:
            huge_pages = os.environ.get(COMMIT_PAGES_ENV, "small") == "huge"
        self.huge_pages = huge_pages and all(
            advise_huge_pages(cache.data_ptr(), cache.numel() * cache.element_size())
            for cache in caches)
        if not self.huge_pages:
            self._commit_to(commit_now)
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=_run, args=(weakref.ref(self), self._stop),
            name="pagedllm-kv-commit", daemon=True)
        weakref.finalize(self, self._stop.set)
        entry = (self._stop, self._thread)
        with _RUNNING_LOCK:
            _RUNNING.add(entry)
        self._thread.start()

    def step(self) -> bool:
        """One look, commit and (at idle) collapse; False once there is nothing left to do."""
        self._scan()
        # Huge pages: nothing before the first block is written (or the process is idle), so
        # that the start does not share its cores with the commits.
        if (self.written or not self.huge_pages) and not self._commit_to(
                self.written + self.blocks_ahead):
            return False
        if self.idle():
            # In steps of IDLE_COMMIT_STEP_BYTES, looking again between them.
            target = min(self.num_blocks, self.written + self.idle_blocks_ahead)
            while self.committed < target and self.idle() and not self._stop.is_set():
                if not self._commit_to(min(target, self.committed + self._idle_step_blocks)):
                    return False
            self._collapse_while_idle()
        return self.committed < self.num_blocks or self._collapse_at is not None

    def idle(self) -> bool:
        """Whether the process's other threads have used under IDLE_CPU_SHARE of a core since
        IDLE_SECONDS ago (as far as this thread's looks tell)."""
        now, cpu = time.monotonic(), _other_threads_cpu()
        then, cpu_then = self._cpu_seen
        self._cpu_seen = (now, cpu)
        if cpu - cpu_then > IDLE_CPU_SHARE * max(now - then, self.poll_seconds):
            self._busy_at = now
        return now - self._busy_at >= self.idle_seconds

    def _scan(self) -> None:
        end = self.committed
        if not end and page_present(self._bases[0]):
            # Huge pages, nothing committed yet: a step wrote block 0's page. NOTE: not read
            # before that: a read would map the huge zero page there (before Linux 6.12 a write
            # then splits it into small pages).
            end = min(self.num_blocks, max(1, HUGE_PAGE_BYTES // self.block_bytes))
        if end > self.written:
            # NOTE: numpy, not a torch op, which could also start an OpenMP team of its own
            # beside the engine's.
            hits = np.flatnonzero(self._probe[self.written:end].any(axis=1))
            if hits.size:
                self.written += int(hits[-1]) + 1

    def _commit_to(self, target: int) -> bool:
        target = min(self.num_blocks, target)
        if target > self.committed and not self._timed_commit(self.committed, target):
            self.failed = True
            logger.info("KV pool pages not committed ahead of use (MADV_POPULATE_WRITE "
                        "refused): the steps fault them in")
            return False
        self.committed = max(self.committed, target)
        return True

    def _timed_commit(self, first: int, end: int) -> bool:
        before = _thread_faults()
        try:
            return self._commit(first, end)
        finally:
            self.page_faults += _thread_faults() - before

    def _commit(self, first: int, end: int) -> bool:
        if self.huge_pages:
            return self._commit_huge(first, end)
        # One call per huge page's worth of each layer's keys and values, so that no call holds
        # the address space's lock for long.
        chunk = max(1, HUGE_PAGE_BYTES // self.block_bytes)
        for start in range(first, end, chunk):
            stop = min(end, start + chunk)
            for base in self._bases:
                if not commit_pages(base + start * self.block_bytes,
                                    (stop - start) * self.block_bytes):
                    return False
        return True

    def _commit_huge(self, first: int, end: int) -> bool:
        """Commits the whole 2 MiB pages holding blocks [first, end) of every layer's keys and
        values, one call per page (a page is faulted in as one huge page where none of it is
        present, else its missing small pages are)."""
        for base, layer_end in zip(self._bases, self._layer_ends):
            start = (base + first * self.block_bytes) // HUGE_PAGE_BYTES * HUGE_PAGE_BYTES
            stop = min(layer_end, -(-(base + end * self.block_bytes) // HUGE_PAGE_BYTES)
                       * HUGE_PAGE_BYTES)
            for address in range(start, stop, HUGE_PAGE_BYTES):
                if not commit_pages(address, min(HUGE_PAGE_BYTES, stop - address)):
                    return False
        return True

    def _collapse_while_idle(self) -> None:
        """Collapses the committed pool's 2 MiB pages in order, one call each, while idle."""
        while self._collapse_at is not None and not self._stop.is_set():
            page, position = self._collapse_at
            base = self._bases[position]
            start = base + (-base % HUGE_PAGE_BYTES) + page * HUGE_PAGE_BYTES
            half_end = base + self.num_blocks * self.block_bytes
            if start + HUGE_PAGE_BYTES > half_end:  # past this half's last whole page
                # NOTE: the halves' pages differ in number by one at most (a value half starts
                # less than a page after its key half's page boundary), and a value half is
                # last: past its end, every half is done.
                if position == len(self._bases) - 1:
                    self._collapse_at = None
                else:
                    self._advance(page, position)
                continue
            if start + HUGE_PAGE_BYTES > base + self.committed * self.block_bytes:
                return  # not committed that far yet
            if not self.idle():
                return
            error = collapse_pages(start, HUGE_PAGE_BYTES)
            if error == errno.EINVAL:  # no MADV_COLLAPSE here: keep the small pages
                logger.info("KV pool pages not collapsed into huge pages (MADV_COLLAPSE "
                            "refused)")
                self._collapse_at = None
                return
            self.num_collapsed += error == 0  # EAGAIN, ENOMEM: none to be had; go on
            self._advance(page, position)

    def _advance(self, page: int, position: int) -> None:
        position += 1
        if position == len(self._bases):
            page, position = page + 1, 0
        self._collapse_at = (page, position)

    def stop(self, timeout: float | None = None) -> None:
        """Ends the thread (it ends by itself once the pool is committed and collapsed)."""
        self._stop.set()
        self._thread.join(timeout)


def _thread_faults() -> int:
    return resource.getrusage(_THREAD if _THREAD is not None else resource.RUSAGE_SELF).ru_minflt


def _other_threads_cpu() -> float:
    """CPU seconds of this process less the calling thread's."""
    process = resource.getrusage(resource.RUSAGE_SELF)
    total = process.ru_utime + process.ru_stime
    if _THREAD is None:
        return total
    thread = resource.getrusage(_THREAD)
    return total - thread.ru_utime - thread.ru_stime


def _run(ref: weakref.ref, stop: threading.Event) -> None:
    try:
        _loop(ref, stop)
    finally:
        with _RUNNING_LOCK:
            _RUNNING.discard((stop, threading.current_thread()))


def _loop(ref: weakref.ref, stop: threading.Event) -> None:
    wait = 0.0
    while not stop.is_set():
        committer = ref()
        if committer is None:
            return
        before = (committer.written, committer.committed)
        if not committer.step():
            return
        changed = before != (committer.written, committer.committed)
        wait = committer.poll_seconds if changed else min(
            MAX_POLL_SECONDS, max(committer.poll_seconds, 2 * wait))
        del committer  # no reference held while waiting: the engine may be collected
        stop.wait(wait)


_EXIT_CALLBACKS: list = []


def stop_at_exit(callback) -> None:
    """`callback(timeout)` is called by the atexit hook too (another thread to stop and join)."""
    _EXIT_CALLBACKS.append(callback)


@atexit.register
def _stop_at_exit() -> None:
    """Stops every running committer's thread and waits for it (briefly), before the
    interpreter finalizes (see the module's docstring)."""
    for callback in _EXIT_CALLBACKS:
        callback(EXIT_JOIN_SECONDS)
    with _RUNNING_LOCK:
        running = list(_RUNNING)
    for stop, _ in running:
        stop.set()
    deadline = time.monotonic() + EXIT_JOIN_SECONDS
    for _, thread in running:
        thread.join(max(0.0, deadline - time.monotonic()))
