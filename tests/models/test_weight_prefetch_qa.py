"""Edge cases of the start-up weight read (models/weight_prefetch.py) found by trying to break
it: which file a dtype="auto" start reads where both dtypes' files exist; a cache file whose
header length is damaged."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import pytest

from pagedllm.models import weight_prefetch
from pagedllm.models.cache_file import CacheFile
from pagedllm.models.cache_layout import (
    CACHE_DIR_ENV,
    MAGIC,
    cache_dir,
    gguf_slot,
    read_header,
    slot_prefix,
)
from pagedllm.models.default_model import auto_dtype


def _slot_file(gguf: Path, dtype: str, mtime_s: int) -> Path:
    """An (empty) cache file in `gguf`'s slot for `dtype`, modified at `mtime_s`."""
    slot = gguf_slot(str(gguf.resolve()), [0, 1], f"torch.{dtype}")
    path = cache_dir() / f"{slot_prefix(slot)}{'0' * 24}.bin"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    os.utime(path, ns=(mtime_s * 10**9, mtime_s * 10**9))
    return path


@pytest.mark.parametrize("newest", ["bfloat16", "float32"])
def test_auto_dtype_reads_only_the_file_of_the_dtype_auto_loads(tmp_path, monkeypatch, newest):
    """A float32 start wrote its file after the bfloat16 one (or the other way): a later
    dtype="auto" start must read the file of the dtype auto means here, not the newest of
    both (the other dtype's 92 MB read is then dropped, and the loader waits for it before it
    reads its own file)."""
    monkeypatch.setenv(CACHE_DIR_ENV, str(tmp_path / "cache"))
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    older = "float32" if newest == "bfloat16" else "bfloat16"
    files = {older: _slot_file(gguf, older, 1), newest: _slot_file(gguf, newest, 2)}
    want = auto_dtype(str(gguf), None)
    for dtype in ("auto", want):
        assert weight_prefetch.candidates(model=str(gguf), dtype=dtype) == [files[want]], dtype


def _damaged_length_file(path: Path, header_len: int) -> Path:
    """A cache file whose header length field is damaged (a flipped high bit, say)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(MAGIC + struct.pack("<Q", header_len) + b'{"key": {}}')
    return path


@pytest.mark.parametrize("header_len", [1 << 40, (1 << 63) + 5])
def test_a_damaged_header_length_is_refused_not_raised(tmp_path, monkeypatch, header_len):
    """A header length far past the file's end is a damaged file (ValueError, so CacheFile
    refuses it and packs again, and the prefetch thread skips it), not an attempt to read
    that many bytes (MemoryError / OverflowError, which nothing catches: LLM() failed, and
    the prefetch thread died with a traceback)."""
    monkeypatch.setenv(CACHE_DIR_ENV, str(tmp_path / "cache"))
    damaged = _damaged_length_file(tmp_path / "one.bin", header_len)
    with damaged.open("rb") as f, pytest.raises(ValueError, match="cut short"):
        read_header(f)
    cache = CacheFile({"kind": "test"}, ["slot"])
    _damaged_length_file(cache.path, header_len)
    assert cache.read_groups() is None
    assert weight_prefetch._read_file(cache.path, "model.gguf", [0, 0]) is None
