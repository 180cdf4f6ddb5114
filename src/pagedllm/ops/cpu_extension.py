"""Builds and loads pagedllm's C++ CPU ops once per machine; None where they cannot be built.

The sources under `csrc/` (the PagedAttention kernel, the fused layer ops, the linear kernels,
the sampler's reductions and the decoder stack that chains them) are compiled with
`torch.utils.cpp_extension` the first time a process needs them and cached under
`cache_root()/torch_extensions/<name>_<key>`, where the key hashes the sources, the flags, the
torch and Python versions and this CPU's flags (the build uses -march=native). Later processes
just load the cached library (a file lock makes concurrent first uses build once). If the build
fails, a warning is logged once, the failure is recorded in the build directory (so other
processes do not retry it), and callers take their pure-torch paths instead.
PAGEDLLM_DISABLE_CPU_KERNEL=1 forces those paths. PAGEDLLM_CPU_EXTRA_CFLAGS adds compiler flags
(and a build of their own), e.g. "-mno-avx512f -mno-amx-tile" to build and test the AVX2 code
on an AVX-512 machine with AMX.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import sys
import threading
from pathlib import Path
from typing import Any

import torch

from pagedllm.paths import cache_root

logger = logging.getLogger(__name__)

EXTENSION_NAME = "pagedllm_cpu_ops"
_CSRC_DIR = Path(__file__).parent / "csrc"
# Compiled; they include vec.h.
_SOURCES = (
    "paged_attention.cpp",
    "layer_ops.cpp",
    "gemv.cpp",
    "gemm.cpp",
    "gemm_bf16.cpp",
    "gemm_amx.cpp",
    "sampling_ops.cpp",
    "decoder_stack.cpp",
    "shm_comm.cpp",
    "quant_dot.cpp",
    "quant_gguf.cpp",
    "quant_int8.cpp",
    "quant_panels.cpp",
    "quant_panels_gemm.cpp",
    "int8_gemm.cpp",
)
_HEADERS = ("vec.h", "ops.h", "deal.h", "quant.h", "int8_gemm.h")
_CFLAGS = ("-O3", "-march=native", "-fopenmp", "-Wno-unknown-pragmas")
_LDFLAGS = ("-fopenmp",)
# Set to 1 to skip the native ops and always take the pure-torch paths.
DISABLE_ENV = "PAGEDLLM_DISABLE_CPU_KERNEL"
# Extra compiler flags, split on spaces, after the others (so they can take a feature away).
EXTRA_CFLAGS_ENV = "PAGEDLLM_CPU_EXTRA_CFLAGS"


def _cflags() -> tuple[str, ...]:
    return (*_CFLAGS, *os.environ.get(EXTRA_CFLAGS_ENV, "").split())

_lock = threading.Lock()
_load_attempted = False
_ops: Any = None
_load_error: str | None = None


def cpu_ops() -> Any:
    """The op namespace (`torch.ops.pagedllm_cpu`), or None if the library cannot be built.

    The first call in a process builds (once per machine and source version) or loads the
    library; a failure is logged once and remembered, so later calls return None at once.
    """
    global _load_attempted, _ops, _load_error
    if _load_attempted:  # fast path, no lock: both globals are set before this flag
        return _ops
    with _lock:
        if not _load_attempted:
            if os.environ.get(DISABLE_ENV, "") not in ("", "0"):
                _load_error = f"disabled by {DISABLE_ENV}"
                logger.info("CPU ops %s; using the pure-torch paths", _load_error)
            else:
                try:
                    _ops = _build_or_load()
                except Exception as exc:  # noqa: BLE001 - any failure means: use torch
                    _load_error = f"{type(exc).__name__}: {exc}"
                    logger.warning(
                        "the C++ CPU ops are unavailable (%s); falling back to the pure-torch "
                        "paths (reference attention backend)",
                        _load_error,
                    )
            _load_attempted = True
    return _ops


def cpu_ops_error() -> str | None:
    """Why `cpu_ops` returned None (after it was called), else None."""
    return _load_error


def build_directory() -> Path:
    """Where this machine's build of the current sources lives."""
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
        *_cflags(),
        *_LDFLAGS,
        torch.__version__,
        sys.version,
        # NOTE: not platform.processor(): on Linux it runs `uname -p` in a subprocess (0.07-0.1
        # s of a start on a loaded machine), and /proc/cpuinfo's flags name the CPU better.
        platform.machine(),
        cpu_flags,
        os.environ.get("CXX", ""),
    ):
        h.update(part.encode() + b"\0")
    return h.hexdigest()[:16]


def _build_or_load() -> Any:
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
    return torch.ops.pagedllm_cpu


def _build(build_dir: Path, failed: Path) -> None:
    from torch.utils.cpp_extension import load

    logger.info("building the C++ CPU ops into %s (once, ~30 s)", build_dir)
    try:
        load(
            name=EXTENSION_NAME,
            sources=[str(_CSRC_DIR / source) for source in _SOURCES],
            extra_cflags=list(_cflags()),
            extra_ldflags=list(_LDFLAGS),
            build_directory=str(build_dir),
            is_python_module=False,
            verbose=False,
        )
    except Exception as exc:
        failed.write_text(f"{type(exc).__name__}: {exc}\n")
        raise
