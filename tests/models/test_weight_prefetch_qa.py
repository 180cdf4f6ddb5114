"""Edge cases of the start-up weight read (models/weight_prefetch.py) found by trying to break
it: which file a dtype="auto" start reads where both dtypes' files exist."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pagedllm.models import weight_prefetch
from pagedllm.models.cache_layout import CACHE_DIR_ENV, cache_dir, gguf_slot, slot_prefix
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
