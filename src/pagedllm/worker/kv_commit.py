"""Commits a reserved host KV pool a little ahead of use, on a background thread, so that
resident memory follows the blocks in use and still no step faults a page in.

The block pool hands out never-used blocks lowest id first (its free queue starts in id order
and freed blocks go to its back), so the written part of the pool grows from block 0 up. The
thread finds the highest block written so far (a written block's first key slot is not all
zero bits; written keys never are in practice, and a block missed only costs the page faults
this avoids) and keeps the next `blocks_ahead` blocks of every layer committed
(MADV_POPULATE_WRITE: faulted in zeroed, without writing, so racing a step's writes is safe).

It stops once the whole pool is committed, or when its cache engine is collected.
"""

from __future__ import annotations

import logging
import resource
import threading
import weakref

import numpy as np
import torch

from pagedllm.worker.host_memory import HUGE_PAGE_BYTES, commit_pages

logger = logging.getLogger(__name__)

# How far ahead of the highest written block the pool is kept committed, in bytes of all layers'
# blocks: a few prefill steps' worth (a 2048-token step takes 128 blocks of 16 tokens; SmolLM2's
# blocks are 360 KiB, so 128 MiB is 364 blocks).
COMMIT_AHEAD_BYTES = 128 << 20
# How often the thread looks for newly written blocks.
POLL_SECONDS = 0.005

_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


class KVPoolCommitter:
    """Keeps blocks [0, committed) of every layer's host pool committed, `blocks_ahead` past
    the highest block written (see the module's docstring). `caches` are the layers' pools,
    each contiguous [2 (key, value), num_blocks, ...] on the CPU."""

    def __init__(self, caches: list[torch.Tensor], blocks_ahead: int,
                 poll_seconds: float = POLL_SECONDS) -> None:
        self.caches = caches
        self.num_blocks = caches[0].shape[1]
        self.blocks_ahead = max(1, blocks_ahead)
        self.block_bytes = caches[0][0, 0].numel() * caches[0].element_size()
        self.probe_elements = caches[0].shape[-1]  # one head of the first slot
        self.written = 0  # blocks [0, written) hold the highest block written so far
        self.committed = 0
        self.failed = False
        # Minor page faults taken by this thread's commits (the engine's own are the process's
        # less these): benchmarks check that the steps take none.
        self.page_faults = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=_run, args=(weakref.ref(self), self._stop, poll_seconds),
            name="pagedllm-kv-commit", daemon=True)
        weakref.finalize(self, self._stop.set)
        self._thread.start()

    def step(self) -> bool:
        """One look and commit; False once there is nothing left to do."""
        if self.committed > self.written:
            keys = self.caches[0][0, self.written:self.committed].reshape(
                self.committed - self.written, -1)[:, :self.probe_elements]
            # NOTE: numpy, not a torch op, which could start an OpenMP team of its own beside
            # the engine's. Bits, not values: -0.0 is written too.
            hits = np.flatnonzero(keys.view(_BITS[keys.element_size()]).numpy().any(axis=1))
            if hits.size:
                self.written += int(hits[-1]) + 1
        target = min(self.num_blocks, self.written + self.blocks_ahead)
        if target > self.committed and not self._timed_commit(self.committed, target):
            self.failed = True
            logger.info("KV pool pages not committed ahead of use (MADV_POPULATE_WRITE "
                        "refused): the steps fault them in")
            return False
        self.committed = max(self.committed, target)
        return self.committed < self.num_blocks

    def _timed_commit(self, first: int, end: int) -> bool:
        before = _thread_faults()
        try:
            return self._commit(first, end)
        finally:
            self.page_faults += _thread_faults() - before

    def _commit(self, first: int, end: int) -> bool:
        # One call per huge page's worth of each layer's keys and values, so that no call holds
        # the address space's lock for long.
        chunk = max(1, HUGE_PAGE_BYTES // self.block_bytes)
        for start in range(first, end, chunk):
            stop = min(end, start + chunk)
            for cache in self.caches:
                for half in range(cache.shape[0]):
                    address = cache[half, start].data_ptr()
                    if not commit_pages(address, (stop - start) * self.block_bytes):
                        return False
        return True

    def stop(self, timeout: float | None = None) -> None:
        """Ends the thread (it ends by itself once the pool is committed)."""
        self._stop.set()
        self._thread.join(timeout)


def _thread_faults() -> int:
    who = getattr(resource, "RUSAGE_THREAD", resource.RUSAGE_SELF)
    return resource.getrusage(who).ru_minflt


def _run(ref: weakref.ref, stop: threading.Event, poll_seconds: float) -> None:
    while not stop.is_set():
        committer = ref()
        if committer is None or not committer.step():
            return
        del committer  # no reference held while waiting: the engine may be collected
        stop.wait(poll_seconds)
