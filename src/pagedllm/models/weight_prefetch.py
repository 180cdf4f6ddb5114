"""The GGUF path's weight cache file read on a thread that starts before torch is imported.

A warm start (`LLM()`, `pagedllm serve`) spends about a second importing torch on one core and
then reads the weight cache file (models/gguf_cache.py; 96 MB for the shipped model) into 2 MB
pages: 0.1-0.3 s, nearly all of it the kernel faulting the pages in and copying, with the GIL
released. `start` begins that read on a thread before torch is imported, on the other core, for
the file this start will ask for. The thread cannot know the file's key (it needs the built
model), so it takes the file of the model's slot (its GGUF file, rank and dtype: the settings a
user switches between) whose header names this GGUF file as it is now, the newest if several.
CacheFile then asks for the bytes (`take`) where its own file is the one read (same inode, size
and modification time, same payload place) and checks them as it checks a file it reads
itself (key, size, checksum); anything else is dropped, unmapped, and the file read again.

Nothing here imports torch before `take`; a start with another model, settings or no cache file
reads nothing. PAGEDLLM_WEIGHT_PREFETCH=0 turns it off.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pagedllm.models.cache_layout import (
    cache_dir,
    cache_enabled,
    gguf_slot,
    read_header,
    slot_prefix,
)
from pagedllm.worker.page_mapping import huge_page_mapping

if TYPE_CHECKING:
    import mmap

    import torch

logger = logging.getLogger(__name__)

PREFETCH_ENV = "PAGEDLLM_WEIGHT_PREFETCH"
# The dtypes a GGUF model may be loaded in (config._DTYPES' torch names; "auto" is one of them).
_GGUF_DTYPES = ("bfloat16", "float32")
# The settings that decide which file a start reads (candidates' keywords).
_SETTINGS = ("model", "quantization", "dtype", "tensor_parallel_size", "device",
             "distributed_executor_backend")


@dataclass
class _Read:
    """One file's payload as the thread read it, and what identifies the file it came from."""

    path: Path
    identity: tuple[int, int, int, int]  # st_dev, st_ino, st_size, st_mtime_ns
    offset: int
    size: int
    mapping: mmap.mmap
    start: int


_lock = threading.Lock()
_thread: threading.Thread | None = None
_read: _Read | None = None


def _identity(stat: os.stat_result) -> tuple[int, int, int, int]:
    return (stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns)


def _gguf_file(model: Any) -> Path | None:
    """The .gguf file `model` (an LLM/EngineConfig setting; None: the shipped one) names."""
    if model is None:
        from pagedllm.models.default_model import default_gguf_path

        try:
            return default_gguf_path()
        except ValueError:
            return None
    if isinstance(model, (str, os.PathLike)) and str(model).endswith(".gguf"):
        path = Path(model).expanduser()
        return path if path.is_file() else None
    return None


def candidates(model: Any = None, quantization: Any = "auto", dtype: Any = "auto",
               tensor_parallel_size: Any = 1, device: Any = "cpu",
               distributed_executor_backend: Any = None) -> list[Path]:
    """The cache files (newest first) a start with these settings may read its weights from:
    none unless the model is a GGUF file kept quantized on one CPU rank in this process."""
    if (quantization not in ("auto", "gguf") or tensor_parallel_size != 1 or device != "cpu"
            or distributed_executor_backend not in (None, "uni")):
        return []
    gguf = _gguf_file(model)
    if gguf is None or not cache_enabled():
        return []
    from pagedllm.config import _DTYPES

    name = _DTYPES.get(dtype, "unknown") if isinstance(dtype, str) else "unknown"
    if name is None:  # "auto"
        name = _auto_gguf_dtype()
    dtypes = _GGUF_DTYPES if name is None else (name,)
    found = []
    directory = cache_dir()
    for each in dtypes:
        prefix = slot_prefix(gguf_slot(str(gguf.resolve()), [0, 1], f"torch.{each}"))
        found += directory.glob(f"{prefix}*.bin")
    stats = []
    for path in found:
        try:
            stats.append((path.stat().st_mtime_ns, path))
        except OSError:
            continue  # replaced meanwhile
    return [path for _, path in sorted(stats, reverse=True)]


def _auto_gguf_dtype() -> str | None:
    """What dtype="auto" loads a GGUF file in on this CPU (default_model.auto_dtype: bfloat16
    where it multiplies bf16 natively, AVX512_BF16 or AMX), from /proc/cpuinfo's flags, as torch
    is not imported yet; None where they cannot be read (then either dtype's file, the newest).
    """
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.partition(":")[2].split())
                    native = "avx512_bf16" in flags or "amx_tile" in flags
                    return "bfloat16" if native else "float32"
    except OSError:
        pass
    return None


def start(**settings: Any) -> bool:
    """Starts reading the cache file of a start with these LLM/EngineConfig `settings` (those
    of _SETTINGS count; the others are ignored) on a thread; False where there is none
    to read (or a read is under way or waiting to be taken)."""
    global _thread
    if os.environ.get(PREFETCH_ENV, "1") in ("0", "false", "no", "off"):
        return False
    try:
        paths = candidates(**{k: settings[k] for k in _SETTINGS if k in settings})
    except (OSError, ValueError, TypeError, RuntimeError) as exc:  # the engine says why
        logger.debug("no weight prefetch: %s", exc)
        return False
    with _lock:
        if not paths or _thread is not None or _read is not None:
            return False
        gguf = _gguf_file(settings.get("model"))
        _thread = threading.Thread(target=_run, args=(paths, gguf), name="weight-prefetch",
                                   daemon=True)
        _thread.start()
    return True


def _run(paths: list[Path], gguf: Path) -> None:
    global _read
    try:
        stat = gguf.stat()
        resolved = str(gguf.resolve())
        for path in paths:
            read = _read_file(path, resolved, [stat.st_size, stat.st_mtime_ns])
            if read is not None:
                with _lock:
                    _read = read
                return
    except (OSError, ValueError) as exc:
        logger.debug("weight prefetch stopped: %s", exc)


def _read_file(path: Path, model_file: str, file_stat: list[int]) -> _Read | None:
    """The file's payload where its header is a GGUF weight cache's of `model_file` as it is
    now (size, modification time), else None."""
    try:
        with open(path, "rb") as f:
            header = read_header(f)
            key = header.get("key")
            if (not isinstance(key, dict) or key.get("kind") != "gguf"
                    or key.get("model_file") != model_file or key.get("file") != file_stat):
                return None
            offset, size = header["payload_offset"], header["payload_bytes"]
            stat = os.fstat(f.fileno())
            if not size or stat.st_size != offset + size:
                return None
            mapping, begin = huge_page_mapping(size)
            f.seek(offset)
            with memoryview(mapping) as view:
                if f.readinto(view[begin:begin + size]) != size:
                    mapping.close()
                    return None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        logger.debug("weight prefetch of %s skipped: %s", path, exc)
        return None
    return _Read(path, _identity(stat), offset, size, mapping, begin)


def take(path: Path, stat: os.stat_result, offset: int, size: int) -> torch.Tensor | None:
    """The payload the thread read, as a uint8 tensor over its mapping, where it is the one of
    the file `path` opened with `stat` (payload at `offset`, `size` bytes); None otherwise (a
    read it made is then dropped). Waits for a read under way."""
    read = _collect()
    if read is None:
        return None
    if (read.path != path or read.identity != _identity(stat) or read.offset != offset
            or read.size != size):
        logger.debug("weight prefetch of %s not used: %s is read", read.path, path)
        read.mapping.close()
        return None
    logger.debug("weights of %s read during the start", path)
    import torch

    return torch.frombuffer(read.mapping, dtype=torch.uint8)[read.start:read.start + size]


def discard() -> None:
    """Drops a read nobody took (the weights came from elsewhere), waiting for one under way."""
    read = _collect()
    if read is not None:
        read.mapping.close()


def _collect() -> _Read | None:
    """Waits for the thread, if any, and hands over what it read (None: nothing)."""
    global _thread, _read
    with _lock:
        thread = _thread
    if thread is not None:
        thread.join()
    with _lock:
        read, _read, _thread = _read, None, None
    return read
