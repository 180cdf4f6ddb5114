"""The cache files of processed weights (models/packed_cache.py: the dense packing;
models/gguf_cache.py: the GGUF path's runs and blocks): named groups of tensors with their
settings, under one key, in `cache_root()/packed_weights/`.

A file is used only whole and checked: its header must carry this start's key, its size must
match, and the wrapping 64-bit sum of its payload's words must be the one recorded (a torn,
truncated or bit-flipped file fails it); otherwise the caller rebuilds the weights and the file
is rewritten. Writers write a temporary file beside it and rename it into place (atomic on one
file system), so two processes starting at once each read either no file or a whole one.

The payload is read (one read, no mapping) into a single buffer in 2 MB pages
(host_memory.huge_page_buffer) and checked there, and the tensors are views of that buffer:
decode steps stream every weight, and 2 MB pages serve them faster than 4 KB ones. Reading
costs 0.06 s for the shipped model's 269 MB of dense packing where a private mapping of the
file, summed and copied out, cost 0.9 s (2026-12-07).

PAGEDLLM_PACKED_WEIGHT_CACHE=0 turns the caches off; PAGEDLLM_PACKED_WEIGHT_CACHE_DIR moves them.
"""

from __future__ import annotations

import json
import logging
import math
import os
import struct
import tempfile
import time
from pathlib import Path

import torch

from pagedllm.models import weight_prefetch
from pagedllm.models.cache_layout import (  # noqa: F401 - re-exported: the settings' names
    CACHE_DIR_ENV,
    CACHE_ENV,
    MAGIC,
    cache_dir,
    cache_enabled,
    cache_path,
    read_header,
)

logger = logging.getLogger(__name__)

ALIGN = 64
_MASK = (1 << 64) - 1


def _word_sum(data: torch.Tensor) -> int:
    """The wrapping sum of a uint8 tensor's little-endian 64-bit words (zero-padded)."""
    whole = data.numel() // 8 * 8
    total = int(data[:whole].view(torch.int64).sum()) if whole else 0
    tail = bytes(data[whole:].tolist())
    return (total + int.from_bytes(tail.ljust(8, b"\0"), "little", signed=True)) & _MASK


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().view(-1).view(torch.uint8)


def _aligned(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


# A group of the file: (name, settings as JSON, tensors by name).
Group = tuple[str, dict, dict[str, torch.Tensor]]


class CacheFile:
    """One cache file of named groups of tensors with their settings: read whole and checked
    (key, size, checksum; see the module docstring) into one buffer in 2 MB pages, written
    atomically. `key`: what the bytes depend on; `slot`: see cache_path."""

    def __init__(self, key: dict, slot: list) -> None:
        self.key = json.loads(json.dumps(key))  # as the header reads back (lists, not tuples)
        self.path = cache_path(self.key, slot)

    def read_groups(self) -> list[Group] | None:
        """The file's groups, as views of one buffer in 2 MB pages holding its payload; None
        where the file is missing, or damaged or another key's (then logged)."""
        if not self.path.is_file():
            return None
        try:
            return self._read_groups()
        except (OSError, ValueError, KeyError, RuntimeError, TypeError) as exc:
            self.refuse(exc)
            return None

    def refuse(self, reason: Exception) -> None:
        """Logs that the file cannot be used (the caller then processes the weights again)."""
        logger.warning("the packed-weight cache %s is not usable (%s): packing again",
                       self.path, reason)

    def _read_groups(self) -> list[Group]:
        from pagedllm.worker.host_memory import huge_page_buffer

        with open(self.path, "rb") as f:
            header = read_header(f)
            if header.get("key") != self.key:
                raise ValueError("written for another model or packing")
            offset, size = header["payload_offset"], header["payload_bytes"]
            stat = os.fstat(f.fileno())
            if stat.st_size != offset + size:
                raise ValueError("truncated or overlong")
            # This file's payload where a thread read it during the start (checked below all
            # the same), else read now.
            payload = weight_prefetch.take(self.path, stat, offset, size)
            if payload is None:
                payload = huge_page_buffer(size)
                f.seek(offset)
                if size and f.readinto(memoryview(payload.numpy())) != size:
                    raise ValueError("truncated while read")
        if _word_sum(payload) != header["checksum"]:
            raise ValueError("checksum mismatch")
        groups = []
        for entry in header["entries"]:
            tensors = {}
            for name, (dtype, shape, at, nbytes) in entry["tensors"].items():
                dtype = getattr(torch, dtype)
                if math.prod(shape) * dtype.itemsize != nbytes or at + nbytes > size:
                    raise ValueError(f"{entry['name']}.{name}: size mismatch")
                tensors[name] = payload[at:at + nbytes].view(dtype).view(tuple(shape))
            groups.append((entry["name"], entry["meta"], tensors))
        return groups  # the buffer lives as long as the views into it

    def write_groups(self, groups: list[Group]) -> bool:
        """Writes the groups (atomically) and removes this slot's older files; False where the
        write failed (logged)."""
        entries, blobs, at, checksum = [], [], 0, 0
        for name, meta, tensors in groups:
            described = {}
            for attr, tensor in tensors.items():
                data = _as_bytes(tensor)
                described[attr] = [str(tensor.dtype).removeprefix("torch."),
                                   list(tensor.shape), at, data.numel()]
                checksum = (checksum + _word_sum(data)) & _MASK
                blobs.append((at, data))
                at = _aligned(at + data.numel())
            entries.append({"name": name, "meta": meta, "tensors": described})
        header = {"key": self.key, "entries": entries, "payload_bytes": at,
                  "checksum": checksum, "payload_offset": 0}
        # The payload starts at the first aligned offset after the header (whose length
        # depends on that offset's digits: fixed at 16 of them).
        header["payload_offset"] = 10**15
        header_len = len(json.dumps(header).encode())
        header["payload_offset"] = _aligned(len(MAGIC) + 8 + header_len)
        encoded = json.dumps(header).encode().ljust(header_len)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=self.path.name + ".", suffix=".tmp",
                                       dir=self.path.parent)
        except OSError as exc:
            logger.warning("packed weights not cached in %s: %s", self.path, exc)
            return False
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(MAGIC + struct.pack("<Q", header_len) + encoded)
                for offset, data in blobs:
                    f.seek(header["payload_offset"] + offset)
                    f.write(memoryview(data.numpy()))
                f.truncate(header["payload_offset"] + at)
            os.replace(tmp, self.path)
        except OSError as exc:
            logger.warning("packed weights not cached in %s: %s", self.path, exc)
            Path(tmp).unlink(missing_ok=True)
            return False
        self._remove_stale()
        return True

    def _remove_stale(self) -> None:
        """Deletes this slot's older files (another key) and files of models that are gone;
        temporary files over an hour old (a writer that died)."""
        prefix = self.path.name.split("-")[0] + "-"
        for other in self.path.parent.iterdir():
            try:
                if other.name.endswith(".tmp"):
                    if time.time() - other.stat().st_mtime > 3600:
                        other.unlink()
                elif other != self.path and other.suffix == ".bin" and (
                        other.name.startswith(prefix) or not _model_exists(other)):
                    other.unlink()
            except OSError:
                pass  # another process removed or replaced it meanwhile


def _model_exists(path: Path) -> bool:
    """Whether the model a cache file was written for (its key's model_dir or model_file) is
    still there; True where the file is unreadable (being written?): leave it."""
    try:
        with open(path, "rb") as f:
            key = read_header(f)["key"]
            model = key.get("model_dir") or key["model_file"]
    except (OSError, ValueError, KeyError, TypeError):
        return True
    return Path(model).exists()
