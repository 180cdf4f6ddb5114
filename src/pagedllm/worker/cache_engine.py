"""The KV cache tensors: one preallocated pool of blocks per layer."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch

from pagedllm.attention import AttentionBackend
from pagedllm.attention.torch_paged import kv_cache_row_size
from pagedllm.startup_profile import mark
from pagedllm.worker.host_memory import (
    HUGE_PAGE_BYTES,
    huge_page_reserved,
    huge_page_zeros,
)
from pagedllm.worker.huge_page_stash import HugePageStash
from pagedllm.worker.kv_commit import (
    COMMIT_AHEAD_BYTES,
    IDLE_COMMIT_AHEAD_BYTES,
    KVPoolCommitter,
    stop_at_exit,
)

logger = logging.getLogger(__name__)

# NOTE: by default the cache takes this share of the memory available at start, capped below,
# so that a laptop or a shared box keeps room for everything else.
DEFAULT_KV_MEMORY_FRACTION = 0.2
DEFAULT_KV_MEMORY_CAP_BYTES = 4 << 30
# On a GPU the pool is the main tenant: this share of the memory left free after the weights.
DEFAULT_GPU_KV_MEMORY_FRACTION = 0.8

# When the host pool's pages are committed: `ahead` (the default) reserves it and a background
# thread commits the pages a little ahead of the highest block written, in small pages while
# the process is busy and in huge pages once it is idle (worker/kv_commit.py: a start that does
# not wait for the pool, resident memory that follows use, no step faults); `start` writes the
# whole pool at start, in huge pages; `lazy` reserves it and each page is committed when a
# block in it is first written, inside the step.
KV_POOL_COMMIT_ENV = "PAGEDLLM_KV_POOL_COMMIT"
KV_POOL_COMMIT_MODES = ("start", "ahead", "lazy")
DEFAULT_KV_POOL_COMMIT = "ahead"


def kv_pool_commit_mode() -> str:
    """PAGEDLLM_KV_POOL_COMMIT (default `ahead`); ValueError naming the allowed values."""
    mode = os.environ.get(KV_POOL_COMMIT_ENV, DEFAULT_KV_POOL_COMMIT)
    if mode not in KV_POOL_COMMIT_MODES:
        raise ValueError(f"{KV_POOL_COMMIT_ENV} must be one of "
                         f"{', '.join(KV_POOL_COMMIT_MODES)}, got {mode!r}")
    return mode


# How much of the `ahead` pool's first blocks (all layers) is committed in 2 MiB pages while the
# engine starts (huge_page_stash.HugePageStash: a thread commits huge pages from this module's
# import on, and the pool takes them when it is made, all layers' first pages first); 0 (the
# default): none. NOTE: opt-in, measured (benchmarks/kv_first_burst.py, 2026-12-07, loaded host, one
# round): 256 MiB made `LLM()` ready 1.0 s later (warm 2.50 s against 1.50; imports 1.85 s
# against 1.10: each 2 MiB MADV_POPULATE_WRITE, ~5 ms on this VM, holds the address space's lock
# that the imports' mmaps wait for), and the first burst, one thread, gained nothing measurable
# (437.8 tok/s against 444.0, `start` 435.5).
KV_PREFAULT_BYTES_ENV = "PAGEDLLM_KV_PREFAULT_BYTES"
DEFAULT_KV_PREFAULT_BYTES = 0

_stash: HugePageStash | None = None


def start_kv_prefault() -> HugePageStash | None:
    """Starts committing the next host pool's first huge pages on a thread (once per process;
    where the commit mode is `ahead`, on Linux). Called when this module is imported: the
    earliest point of an engine's start in the worker; calling it earlier is harmless."""
    global _stash
    if _stash is not None or not os.path.exists("/proc/self/smaps"):
        return _stash or None
    try:
        if kv_pool_commit_mode() != "ahead":
            return None
        nbytes = int(os.environ.get(KV_PREFAULT_BYTES_ENV, DEFAULT_KV_PREFAULT_BYTES))
    except ValueError:
        return None  # a bad setting is reported where the engine reads it
    if nbytes >= HUGE_PAGE_BYTES:
        _stash = HugePageStash(nbytes)
        stop_at_exit(_stash.stop)
    return _stash


def _take_kv_prefault() -> HugePageStash | None:
    """The stash for the first pool made (None for the next ones: their pages are gone)."""
    global _stash
    stash, _stash = _stash, False
    return stash or None


def _forget_kv_prefault_in_child() -> None:
    """A forked child's pools take no stash (its thread did not survive the fork)."""
    global _stash
    stash, _stash = _stash, False
    if stash:
        stash.forget_in_child()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_kv_prefault_in_child)


def _pool_pages_in_order(caches: list[torch.Tensor]) -> list[int]:
    """The 2 MiB pages wholly inside the layers' pools, in the order the first blocks need them:
    every layer's key and value pages holding blocks from 0 up, page by page."""
    halves = []
    for cache in caches:
        start = cache.data_ptr()
        end = start + cache.numel() * cache.element_size()
        for half in range(cache.shape[0]):
            first = cache[half].data_ptr() // HUGE_PAGE_BYTES * HUGE_PAGE_BYTES
            halves.append(range(max(first, start), end - HUGE_PAGE_BYTES + 1, HUGE_PAGE_BYTES))
    pages, seen = [], set()
    for index in range(max((len(h) for h in halves), default=0)):
        for half in halves:
            if index < len(half) and half[index] not in seen:
                seen.add(half[index])
                pages.append(half[index])
    return pages


@dataclass(frozen=True)
class KVCacheSpec:
    """Shape of the cache of one model."""

    num_layers: int
    num_kv_heads: int
    head_size: int
    block_size: int
    # The cache's element type (EngineConfig.kv_cache_torch_dtype): the model's, or float8_e5m2.
    dtype: torch.dtype

    @property
    def bytes_per_block(self) -> int:
        element = torch.empty((), dtype=self.dtype).element_size()
        row = kv_cache_row_size(self.head_size, self.dtype)  # int8: the values and their scale
        return 2 * self.num_layers * self.block_size * self.num_kv_heads * row * element


def available_memory_bytes() -> int:
    """MemAvailable from /proc/meminfo (Linux); falls back to 8 GiB elsewhere."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 << 30


def default_kv_memory_bytes(device: torch.device) -> int:
    """The pool's default size: most of a GPU's free memory, a capped slice of host RAM on CPU.

    On CPU the pool shares RAM with everything else on the machine, hence the small share.
    """
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * DEFAULT_GPU_KV_MEMORY_FRACTION)
    return min(int(available_memory_bytes() * DEFAULT_KV_MEMORY_FRACTION),
               DEFAULT_KV_MEMORY_CAP_BYTES)


def choose_num_blocks(
    spec: KVCacheSpec,
    num_kv_blocks: int | None,
    kv_cache_memory_bytes: int | None,
    device: torch.device,
) -> int:
    if num_kv_blocks is not None:
        return num_kv_blocks
    budget = kv_cache_memory_bytes
    if budget is None:
        budget = default_kv_memory_bytes(device)
    num_blocks = budget // spec.bytes_per_block
    if num_blocks < 1:
        raise ValueError(
            f"kv_cache_memory_bytes={budget} is smaller than one KV block "
            f"({spec.bytes_per_block} bytes): raise it or lower block_size"
        )
    return num_blocks


def check_host_memory(spec: KVCacheSpec, num_blocks: int, num_cpu_blocks: int,
                      device: torch.device) -> None:
    """Refuses block pools the host cannot hold, in every commit mode: a pool written at start,
    or committed as blocks are used, would otherwise grow until the kernel's OOM killer ended
    the process, with no word said."""
    device_bytes = num_blocks * spec.bytes_per_block if device.type == "cpu" else 0
    swap_bytes = num_cpu_blocks * spec.bytes_per_block
    available = available_memory_bytes()
    if device_bytes + swap_bytes > available:
        raise ValueError(
            f"the KV cache needs {(device_bytes + swap_bytes) / 2**30:.1f} GiB of host memory "
            f"({device_bytes / 2**30:.1f} GiB for {num_blocks} blocks on {device.type}, "
            f"{swap_bytes / 2**30:.1f} GiB of swap space) but {available / 2**30:.1f} GiB is "
            "available: lower num_kv_blocks, kv_cache_memory_bytes or swap_space"
        )


class CacheEngine:
    """Allocates every layer's device block pool (and host pool for swapping) at start, and
    moves blocks between and within them; nothing is allocated per step."""

    def __init__(
        self,
        spec: KVCacheSpec,
        num_blocks: int,
        backend: AttentionBackend,
        device: torch.device,
        num_cpu_blocks: int = 0,
    ) -> None:
        mark("weights packed")
        self.spec = spec
        self.num_blocks = num_blocks
        self.num_cpu_blocks = num_cpu_blocks
        row = kv_cache_row_size(spec.head_size, spec.dtype)
        shape = backend.kv_cache_shape(num_blocks, spec.block_size, spec.num_kv_heads, row)
        # NOTE: zeroed, not empty: a backend may read a padded tail that was never written (a
        # reserved pool reads as zeros too). On the host, in huge pages: decode attention reads
        # every sequence's blocks each step.
        mode = kv_pool_commit_mode()
        self.kv_caches = [
            self._host_pool(mode, shape, spec.dtype) if device.type == "cpu"
            else torch.zeros(shape, dtype=spec.dtype, device=device)
            for _ in range(spec.num_layers)
        ]
        self.committer = None
        self.prefaulted_pages = 0  # 2 MiB pages the pool took from the start's stash
        if mode == "ahead" and device.type == "cpu" and num_blocks and spec.num_layers:
            stash = _take_kv_prefault()
            if stash is not None:
                pages = _pool_pages_in_order(self.kv_caches)
                # NOTE: mremap is given the pages in order: the stash's committed prefix.
                self.prefaulted_pages = stash.move_into(pages)
            idle_blocks_ahead = IDLE_COMMIT_AHEAD_BYTES // spec.bytes_per_block
            self.committer = KVPoolCommitter(
                self.kv_caches, COMMIT_AHEAD_BYTES // spec.bytes_per_block,
                idle_blocks_ahead=idle_blocks_ahead, commit_now=idle_blocks_ahead)
        # NOTE: a separate tensor even on a CPU-only machine, so that swapping really copies,
        # exactly as it must between GPU and host memory.
        cpu_shape = backend.kv_cache_shape(num_cpu_blocks, spec.block_size, spec.num_kv_heads,
                                           row)
        # Pinned beside a GPU, so block moves between the two pools run at full bus speed.
        pin = device.type == "cuda"
        self.cpu_caches = [
            torch.zeros(cpu_shape, dtype=spec.dtype, device="cpu", pin_memory=pin)
            for _ in range(spec.num_layers if num_cpu_blocks else 0)
        ]
        logger.info(
            "KV cache: %d blocks of %d tokens = %d tokens, %.1f MiB (%s)",
            num_blocks,
            spec.block_size,
            num_blocks * spec.block_size,
            num_blocks * spec.bytes_per_block / 2**20,
            spec.dtype,
        )
        mark("kv pool")
        if self.prefaulted_pages:
            logger.debug("KV pool: %d huge pages committed during the start",
                         self.prefaulted_pages)
        if num_cpu_blocks:
            logger.info("swap space: %d host blocks, %.1f MiB", num_cpu_blocks,
                        num_cpu_blocks * spec.bytes_per_block / 2**20)

    @staticmethod
    def _host_pool(mode: str, shape, dtype: torch.dtype) -> torch.Tensor:
        if mode == "start":
            return huge_page_zeros(shape, dtype)
        # `ahead` commits small pages and collapses them into huge ones when idle (kv_commit.py:
        # faulting in 2 MiB pages during the steps cost them more than the small pages do).
        return huge_page_reserved(shape, dtype, advise=mode == "lazy")

    def swap_out(self, pairs: list[tuple[int, int]]) -> None:
        """Copies (device block, host block) pairs, every layer."""
        self._copy(pairs, self.kv_caches, self.cpu_caches)

    def swap_in(self, pairs: list[tuple[int, int]]) -> None:
        """Copies (host block, device block) pairs, every layer."""
        self._copy(pairs, self.cpu_caches, self.kv_caches)

    def copy(self, pairs: list[tuple[int, int]]) -> None:
        """Copies (source, destination) device blocks, every layer: copy-on-write."""
        self._copy(pairs, self.kv_caches, self.kv_caches)

    @staticmethod
    def _copy(pairs, src_caches: list[torch.Tensor], dst_caches: list[torch.Tensor]) -> None:
        if not pairs:
            return
        src_ids = torch.tensor([p[0] for p in pairs], device=src_caches[0].device)
        dst_ids = torch.tensor([p[1] for p in pairs], device=dst_caches[0].device)
        for src, dst in zip(src_caches, dst_caches):
            # NOTE: an fp8 cache moves as bytes: torch has no index ops for float8.
            if src.dtype == torch.float8_e5m2:
                src, dst = src.view(torch.uint8), dst.view(torch.uint8)
            # cache: [2, num_blocks, block_size, kv_heads, head]; blocks are dim 1.
            blocks = src.index_select(1, src_ids).to(dst.device)
            dst.index_copy_(1, dst_ids, blocks)


start_kv_prefault()
