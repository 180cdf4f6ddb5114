"""Anonymous memory in 2 MB-aligned runs, without torch: host_memory.huge_page_buffer wraps one
in a tensor, and models/weight_prefetch.py fills one before torch is imported."""

from __future__ import annotations

import ctypes
import logging
import mmap

logger = logging.getLogger(__name__)

HUGE_PAGE_BYTES = 2 << 20


def huge_page_mapping(nbytes: int, advise: bool = True) -> tuple[mmap.mmap, int]:
    """A fresh private anonymous mapping and the offset in it of `nbytes` zeroed bytes that
    start on a 2 MB boundary, advised MADV_HUGEPAGE (`advise`) so that the kernel may back them
    with transparent huge pages as they are first written (Linux with THP in `madvise` or
    `always` mode; elsewhere 4 KB pages). `nbytes` > 0.

    NOTE: private, not mmap's default MAP_SHARED: shared anonymous memory is shmem, which
    takes huge pages only under a separate setting (shmem_enabled, off by default).
    """
    private = getattr(mmap, "MAP_PRIVATE", 0) | getattr(mmap, "MAP_ANONYMOUS", 0)
    mapping = mmap.mmap(-1, nbytes + HUGE_PAGE_BYTES, flags=private)
    view = ctypes.c_char.from_buffer(mapping)
    start = -ctypes.addressof(view) % HUGE_PAGE_BYTES
    del view  # the buffer export: the mapping can be closed again once it is gone
    if advise and hasattr(mmap, "MADV_HUGEPAGE"):
        try:
            mapping.madvise(mmap.MADV_HUGEPAGE, start, nbytes)
        except OSError as exc:  # a kernel built without THP
            logger.debug("no huge-page advice: %s", exc)
    return mapping, start
