"""The weight cache file read on a thread during the start (models/weight_prefetch.py): a warm
start takes the bytes the thread read, with the same state and tokens as one that reads the
file itself; bytes of a file replaced or damaged after the thread read it are never used; a
start with other settings reads nothing; and a fresh process's `LLM()` starts the read before
torch is imported."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pagedllm.models import weight_prefetch
from pagedllm.models.cache_file import CacheFile
from tests.models.test_gguf_weight_cache import (  # noqa: F401 - fixtures
    assert_same_state,
    cache_dir,
    gguf_file,
    model_file,
    processed,
    start,
    tokens,
)
from tests.worker.test_packed_weight_cache import (
    _flip_payload_byte,
    check_damage_is_rebuilt,
    only_file,
)


@pytest.fixture
def taken(monkeypatch) -> list[bool]:
    """For each CacheFile read: whether it used the thread's bytes."""
    seen = []
    original = weight_prefetch.take

    def counting(*args, **kwargs):
        payload = original(*args, **kwargs)
        seen.append(payload is not None)
        return payload

    monkeypatch.setattr(weight_prefetch, "take", counting)
    yield seen
    weight_prefetch.discard()


def prefetch(model_file: Path) -> bool:
    return weight_prefetch.start(model=str(model_file), quantization="auto")


def test_a_warm_start_takes_the_bytes_read_during_the_start(model_file, cache_dir, processed,
                                                            taken):
    cold = start(model_file)
    assert not prefetch(cache_dir.parent / "absent.gguf")
    assert prefetch(model_file)
    processed.clear()
    warm = start(model_file)
    assert taken == [True] and not processed
    assert_same_state(cold, warm)
    assert tokens(warm) == tokens(cold)
    assert weight_prefetch._read is None and weight_prefetch._thread is None


def test_other_settings_read_nothing(model_file, cache_dir):
    start(model_file)
    for settings in ({"quantization": "none"}, {"quantization": "int8"},
                     {"tensor_parallel_size": 2}, {"device": "cuda"},
                     {"distributed_executor_backend": "mp"}, {"dtype": "float32"}):
        assert not weight_prefetch.candidates(model=str(model_file), **settings), settings
    assert weight_prefetch.candidates(model=str(model_file), dtype="bfloat16")
    assert not weight_prefetch.candidates(model=str(model_file.with_suffix(".bin")))


def test_a_file_replaced_after_the_read_is_read_again(model_file, cache_dir, processed, taken):
    fresh = tokens(start(model_file))
    assert prefetch(model_file)
    weight_prefetch._thread.join()
    path = only_file(cache_dir)
    copy = path.with_suffix(".new")
    copy.write_bytes(path.read_bytes())
    os.replace(copy, path)  # a writer's atomic replace: another inode
    processed.clear()
    assert tokens(start(model_file)) == fresh
    assert taken == [False] and not processed  # the file itself was read, whole and valid


def test_bytes_read_from_a_damaged_file_are_refused(model_file, cache_dir, processed, taken,
                                                    caplog):
    def damage_then_prefetch(path: Path) -> None:
        _flip_payload_byte(path)
        assert prefetch(model_file)

    check_damage_is_rebuilt(lambda: start(model_file), tokens, cache_dir, processed,
                            damage_then_prefetch, caplog)
    assert taken[0]  # the damaged start took the thread's bytes, and refused them


def test_a_read_nobody_takes_is_unmapped(model_file, cache_dir):
    start(model_file)
    assert prefetch(model_file)
    weight_prefetch._thread.join()
    mapping = weight_prefetch._read.mapping
    weight_prefetch.discard()
    assert mapping.closed and weight_prefetch._read is None


def test_a_read_for_another_file_is_dropped(model_file, cache_dir, taken):
    start(model_file)
    assert prefetch(model_file)
    weight_prefetch._thread.join()
    mapping = weight_prefetch._read.mapping
    path = only_file(cache_dir)
    assert weight_prefetch.take(path.with_name("other.bin"), path.stat(), 0, 1) is None
    assert mapping.closed
    assert CacheFile  # the reader that asks (cache_file.CacheFile._read_groups)


FRESH_CHILD = r"""
import logging, sys
logging.basicConfig(level=logging.WARNING)
logging.getLogger("pagedllm.models.weight_prefetch").setLevel(logging.DEBUG)
from pagedllm import LLM
assert "torch" not in sys.modules, "from pagedllm import LLM imported torch"
LLM(sys.argv[1], quantization="auto", num_kv_blocks=16, block_size=8)
"""


def test_a_fresh_process_reads_the_file_while_torch_imports(model_file, cache_dir):
    start(model_file)  # writes the cache file
    env = {k: v for k, v in os.environ.items() if k != weight_prefetch.PREFETCH_ENV}
    proc = subprocess.run([sys.executable, "-c", FRESH_CHILD, str(model_file)], env=env,
                          capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "read during the start" in proc.stderr, proc.stderr[-3000:]
    logging.getLogger(__name__).debug(proc.stderr)
