"""Where the processed-weight cache files live and how their header reads, without torch:
models/cache_file.py reads and writes the files, and models/weight_prefetch.py finds and reads
one before torch is imported.

A file is MAGIC, the header's length (8 bytes, little-endian), the header (JSON: the key, the
groups' entries, the payload's offset, size and checksum), then the payload. Its name is
`<slot digest>-<key digest>.bin` in cache_dir(): the slot is the model with the settings a user
may switch between (dtypes, rank), so that a new file replaces only its own slot's old ones.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path
from typing import BinaryIO

from pagedllm.paths import cache_root

CACHE_ENV = "PAGEDLLM_PACKED_WEIGHT_CACHE"
CACHE_DIR_ENV = "PAGEDLLM_PACKED_WEIGHT_CACHE_DIR"
MAGIC = b"PGLLMPW1"


def cache_enabled() -> bool:
    return os.environ.get(CACHE_ENV, "1") not in ("0", "false", "no", "off")


def cache_dir() -> Path:
    """$PAGEDLLM_PACKED_WEIGHT_CACHE_DIR, else `packed_weights` in pagedllm's cache folder."""
    return Path(os.environ.get(CACHE_DIR_ENV) or cache_root() / "packed_weights")


def slot_prefix(slot: list) -> str:
    """The start of the names of `slot`'s files (module docstring)."""
    return hashlib.sha256(json.dumps(slot).encode()).hexdigest()[:12] + "-"


def gguf_slot(model_file: str, tp: list[int], dtype: str) -> list:
    """A GGUF weight cache file's slot (models/gguf_cache.py): the GGUF file, the rank and the
    dtype."""
    return [model_file, tp, dtype]


def cache_path(key: dict, slot: list) -> Path:
    """`<slot digest>-<key digest>.bin` in cache_dir()."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
    return cache_dir() / f"{slot_prefix(slot)}{digest[:24]}.bin"


def read_header(f: BinaryIO) -> dict:
    """The header of the file open in `f` (read from its start); ValueError where it is not a
    cache file or its header is cut short."""
    head = f.read(len(MAGIC) + 8)
    if len(head) < len(MAGIC) + 8 or head[:len(MAGIC)] != MAGIC:
        raise ValueError("not a packed-weight file")
    (header_len,) = struct.unpack("<Q", head[len(MAGIC):])
    # NOTE: checked against the file's size first: a damaged length (2**40, say) would else be
    # a read of that many bytes, a MemoryError or OverflowError that no caller refuses.
    if header_len > os.fstat(f.fileno()).st_size - len(head):
        raise ValueError("header cut short")
    encoded = f.read(header_len)
    if len(encoded) != header_len:
        raise ValueError("header cut short")
    header = json.loads(encoded)
    if not isinstance(header, dict):
        raise ValueError("not a packed-weight header")  # noqa: TRY004 - a damaged file
    return header
