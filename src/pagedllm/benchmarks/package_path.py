"""A PYTHONPATH entry that makes this pagedllm importable in another Python, and nothing else.

The benchmarks start engines and servers in subprocesses (`python -m
pagedllm.benchmarks.throughput_runner`, `python -m pagedllm serve`), some under another
virtualenv where pagedllm is not installed (vLLM's). The folder holding the package may be a
site-packages, whose torch and transformers would then shadow that virtualenv's own, so the
entry is a temporary folder holding only a link to the package. The subprocess then imports the
same pagedllm as this process, installed or not.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from functools import lru_cache
from pathlib import Path


@lru_cache(maxsize=1)
def package_only_dir() -> str:
    """A temporary folder holding `pagedllm` (a link to this package), removed at exit."""
    package = Path(__file__).resolve().parents[1]
    folder = tempfile.mkdtemp(prefix="pagedllm-path-")
    os.symlink(package, os.path.join(folder, "pagedllm"), target_is_directory=True)
    atexit.register(shutil.rmtree, folder, ignore_errors=True)  # removes the link, not the package
    return folder


def with_pagedllm_on_path(env: dict[str, str]) -> dict[str, str]:
    """`env` with package_only_dir() first on its PYTHONPATH."""
    entries = [package_only_dir(), *filter(None, env.get("PYTHONPATH", "").split(os.pathsep))]
    return {**env, "PYTHONPATH": os.pathsep.join(entries)}
