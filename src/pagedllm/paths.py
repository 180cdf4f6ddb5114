"""Where pagedllm keeps what it builds once per machine: converted models and compiled ops."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """`$PAGEDLLM_CACHE_DIR`, else `pagedllm` under `$XDG_CACHE_HOME` (default `~/.cache`)."""
    root = os.environ.get("PAGEDLLM_CACHE_DIR")
    if root:
        return Path(root)
    xdg = os.environ.get("XDG_CACHE_HOME", str(Path.home() / ".cache"))
    return Path(xdg) / "pagedllm"
