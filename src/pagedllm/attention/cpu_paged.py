"""A fused PagedAttention backend for CPU: C++/OpenMP, built on first use, torch fallback.

The kernel (`csrc/paged_attention.cpp`) writes the new K/V into their slots and attends
causally through the block tables, reading K/V in place from the block pool. It is compiled
with `torch.utils.cpp_extension` the first time a process needs it and cached under
`cache_root()/torch_extensions/<name>_<key>`, where the key hashes the sources, the flags, the
torch and Python versions and this CPU's flags (the build uses -march=native). Later processes
just load the cached library (a file lock makes concurrent first uses build once). If the build
fails, a warning is logged once, the failure is recorded in the build directory (so other
processes do not retry it), and every call takes the `torch_paged` reference path instead.
PAGEDLLM_DISABLE_CPU_KERNEL=1 forces that path.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import sys
import threading
from pathlib import Path
from typing import Callable, ClassVar

import torch

from pagedllm.attention.backend import AttentionMetadata
from pagedllm.attention.torch_paged import TorchPagedAttention

logger = logging.getLogger(__name__)

EXTENSION_NAME = "pagedllm_cpu_paged"
_CSRC_DIR = Path(__file__).parent / "csrc"
_SOURCES = ("paged_attention.cpp",)  # compiled; it includes vec.h
_HEADERS = ("vec.h",)
_CFLAGS = ("-O3", "-march=native", "-fopenmp", "-Wno-unknown-pragmas")
_LDFLAGS = ("-fopenmp",)
# Set to 1 to skip the kernel and always take the reference path.
DISABLE_ENV = "PAGEDLLM_DISABLE_CPU_KERNEL"
_KERNEL_DTYPES = (torch.float32, torch.bfloat16)

_lock = threading.Lock()
_load_attempted = False
_op: Callable[..., None] | None = None
_load_error: str | None = None


class CpuPagedAttention(TorchPagedAttention):
    """The `torch_paged` contract, computed by the fused C++ kernel where it applies.

    The kernel takes CPU tensors, a contiguous fp32 or bf16 cache, key/value in the cache's
    dtype and an fp32 or bf16 query; anything else (and a failed build) goes to the reference.
    """

    name: ClassVar[str] = "cpu_paged"

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        metadata: AttentionMetadata,
    ) -> torch.Tensor:
        """Stores key/value at `metadata.slot_mapping`, then attends causally per sequence.

        Args:
            query: [num_tokens, num_heads, head_size]
            key, value: [num_tokens, num_kv_heads, head_size]
            kv_cache: [2, num_blocks, block_size, num_kv_heads, head_size], updated in place.
        Returns:
            [num_tokens, num_heads, head_size], in query's dtype.
        """
        op = load_kernel() if _kernel_applies(query, key, value, kv_cache) else None
        if op is None:
            return super().forward(query, key, value, kv_cache, metadata)
        assert query.shape[0] == metadata.num_tokens, (query.shape, metadata.num_tokens)
        output = torch.empty(query.shape, dtype=query.dtype)  # [num_tokens, num_heads, head_size]
        op(
            output,
            _last_dim_contiguous(query),
            _last_dim_contiguous(key),
            _last_dim_contiguous(value),
            kv_cache,
            _as(metadata.slot_mapping, torch.int64),
            _as(metadata.query_start_loc, torch.int64),
            _as(metadata.seq_lens, torch.int64),
            _as(metadata.block_tables, torch.int32),
            self.scale,
        )
        return output


def _kernel_applies(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor
) -> bool:
    return (
        all(t.device.type == "cpu" for t in (query, key, value, kv_cache))
        and kv_cache.dtype in _KERNEL_DTYPES
        and query.dtype in _KERNEL_DTYPES
        and key.dtype == kv_cache.dtype
        and value.dtype == kv_cache.dtype
        and kv_cache.is_contiguous()
    )


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _as(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # NOTE: checks in Python first: this runs per layer per step, and a no-op `.to()` still
    # costs a dispatcher round trip.
    return t if t.dtype == dtype and t.is_contiguous() else t.to(dtype).contiguous()


def load_kernel() -> Callable[..., None] | None:
    """The kernel op (`torch.ops.pagedllm_cpu.paged_attention`), or None if it cannot be built.

    The first call in a process builds (once per machine and source version) or loads the
    library; a failure is logged once and remembered, so later calls return None at once.
    """
    global _load_attempted, _op, _load_error
    if _load_attempted:  # fast path, no lock: both globals are set before this flag
        return _op
    with _lock:
        if not _load_attempted:
            if os.environ.get(DISABLE_ENV, "") not in ("", "0"):
                _load_error = f"disabled by {DISABLE_ENV}"
                logger.info("cpu_paged: C++ kernel %s; using the torch_paged path", _load_error)
            else:
                try:
                    _op = _build_or_load()
                except Exception as exc:  # noqa: BLE001 - any failure means: use the reference
                    _load_error = f"{type(exc).__name__}: {exc}"
                    logger.warning(
                        "cpu_paged: the C++ kernel is unavailable (%s); falling back to the "
                        "torch_paged reference path",
                        _load_error,
                    )
            _load_attempted = True
    return _op


def kernel_load_error() -> str | None:
    """Why `load_kernel` returned None (after it was called), else None."""
    return _load_error


def build_directory() -> Path:
    """Where this machine's build of the current sources lives."""
    from pagedllm.models.default_model import cache_root

    return cache_root() / "torch_extensions" / f"{EXTENSION_NAME}_{_build_key()}"


def _build_key() -> str:
    """Hashes everything a cached library depends on; a change means a fresh build directory."""
    h = hashlib.sha256()
    for source in (*_SOURCES, *_HEADERS):
        h.update((_CSRC_DIR / source).read_bytes())
    cpu_flags = ""
    try:  # -march=native: a library built for one CPU may not run on another
        with open("/proc/cpuinfo") as f:
            cpu_flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        pass
    for part in (
        *_CFLAGS,
        *_LDFLAGS,
        torch.__version__,
        sys.version,
        platform.machine(),
        platform.processor(),
        cpu_flags,
        os.environ.get("CXX", ""),
    ):
        h.update(part.encode() + b"\0")
    return h.hexdigest()[:16]


def _build_or_load() -> Callable[..., None]:
    build_dir = build_directory()
    library = build_dir / f"{EXTENSION_NAME}.so"
    # NOTE: a stamp rather than the .so itself marks a finished build: the linker writes the
    # .so in place, and another process must never load it half-written.
    done, failed = build_dir / "BUILT", build_dir / "BUILD_FAILED"
    if not done.is_file():
        if failed.is_file():
            raise RuntimeError(f"an earlier build failed; see {failed} (delete it to retry)")
        build_dir.mkdir(parents=True, exist_ok=True)
        from filelock import FileLock

        with FileLock(str(build_dir) + ".lock"):
            if failed.is_file():  # another process failed meanwhile
                raise RuntimeError(f"the build failed; see {failed} (delete it to retry)")
            if not done.is_file():  # another process may have built it meanwhile
                _build(build_dir, failed)
                done.write_text(str(library) + "\n")
    torch.ops.load_library(str(library))
    return torch.ops.pagedllm_cpu.paged_attention


def _build(build_dir: Path, failed: Path) -> None:
    from torch.utils.cpp_extension import load

    logger.info("cpu_paged: building the C++ kernel into %s (once, ~20 s)", build_dir)
    try:
        load(
            name=EXTENSION_NAME,
            sources=[str(_CSRC_DIR / source) for source in _SOURCES],
            extra_cflags=list(_CFLAGS),
            extra_ldflags=list(_LDFLAGS),
            build_directory=str(build_dir),
            is_python_module=False,
            verbose=False,
        )
    except Exception as exc:
        failed.write_text(f"{type(exc).__name__}: {exc}\n")
        raise
