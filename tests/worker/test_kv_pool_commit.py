"""The host KV pool committed at start or lazily (PAGEDLLM_KV_POOL_COMMIT): the same tokens
either way, the lazy pool resident only where blocks were written, and a pool the host cannot
hold refused at start in both modes."""

from __future__ import annotations

import os

import pytest
import torch

from pagedllm import LLM, SamplingParams
from pagedllm.worker.cache_engine import KV_POOL_COMMIT_ENV
from pagedllm.worker.host_memory import HUGE_PAGE_BYTES, collapse_pages, huge_page_reserved

PROMPTS = [{"prompt_token_ids": ids} for ids in ([5, 17, 301, 42, 9], list(range(3, 40)), [7] * 20)]


@pytest.fixture(scope="module")
def tiny_dir(tiny_llama_factory):
    return tiny_llama_factory(num_heads=4, num_kv_heads=2)


def _generate(tiny_dir, mode: str, monkeypatch) -> list[list[int]]:
    monkeypatch.setenv(KV_POOL_COMMIT_ENV, mode)
    llm = LLM(str(tiny_dir), num_kv_blocks=64, block_size=8, dtype="float32")
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    out = llm.generate(PROMPTS, params, use_tqdm=False)
    return [o.outputs[0].token_ids for o in out]


@pytest.mark.parametrize("mode", ["lazy", "ahead"])
def test_a_pool_committed_later_gives_the_tokens_of_one_written_at_start(tiny_dir, mode,
                                                                         monkeypatch):
    assert _generate(tiny_dir, mode, monkeypatch) == _generate(tiny_dir, "start", monkeypatch)


def _resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="Linux's /proc")
def test_a_reserved_pool_reads_as_zeros_and_is_resident_only_where_written():
    before = _resident_bytes()
    pool = huge_page_reserved((2, 64, 1 << 20), torch.bfloat16)  # 256 MiB
    assert _resident_bytes() - before < 16 << 20
    pool[0, :8].fill_(1)  # 16 MiB of blocks handed out
    grown = _resident_bytes() - before
    assert 16 << 20 <= grown < 64 << 20
    assert int(pool[1].count_nonzero()) == 0 and pool.dtype == torch.bfloat16


@pytest.mark.parametrize("mode", ["start", "ahead", "lazy"])
def test_a_pool_larger_than_the_host_is_refused_at_start(tiny_dir, monkeypatch, mode):
    monkeypatch.setenv(KV_POOL_COMMIT_ENV, mode)
    with pytest.raises(ValueError, match="GiB of host memory"):
        LLM(str(tiny_dir), num_kv_blocks=10**9)


def test_an_unknown_commit_mode_is_refused(tiny_dir, monkeypatch):
    monkeypatch.setenv(KV_POOL_COMMIT_ENV, "eager")
    with pytest.raises(ValueError, match=f"{KV_POOL_COMMIT_ENV} must be one of start, ahead, lazy"):
        LLM(str(tiny_dir), num_kv_blocks=16)


def _anon_huge_bytes(addresses: list[int]) -> int:
    """AnonHugePages of this process's mappings that hold any of `addresses`, each counted once
    (adjacent pools may share one mapping)."""
    total, inside = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            fields = line.split()
            if "-" in fields[0] and not fields[0].endswith(":"):
                start, end = (int(x, 16) for x in fields[0].split("-"))
                inside = any(start <= a < end for a in addresses)
            elif inside and fields[0] == "AnonHugePages:":
                total += int(fields[1]) * 1024
    return total


def _can_collapse() -> bool:
    if not os.path.exists("/proc/self/smaps"):
        return False
    probe = huge_page_reserved((HUGE_PAGE_BYTES,), torch.uint8, advise=False)
    probe[0] = 1
    return collapse_pages(probe.data_ptr(), HUGE_PAGE_BYTES) == 0


@pytest.mark.skipif(not _can_collapse(), reason="no MADV_COLLAPSE (Linux 6.1+) here")
def test_an_idle_engine_has_its_pool_committed_in_huge_pages(tiny_dir, monkeypatch):
    monkeypatch.setenv(KV_POOL_COMMIT_ENV, "ahead")
    llm = LLM(str(tiny_dir), num_kv_blocks=4096, block_size=8, dtype="float32")
    engine = llm.llm_engine.worker.cache_engine
    pool = engine.kv_caches[0]
    half_bytes = pool[0].numel() * pool.element_size()
    assert half_bytes % HUGE_PAGE_BYTES == 0  # both halves of every layer are whole pages
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    llm.generate(PROMPTS, params, use_tqdm=False)
    # Idle: the pool (far smaller than what is committed ahead at idle) is committed whole and
    # made of huge pages, then the thread ends.
    engine.committer._thread.join(timeout=120)
    assert not engine.committer._thread.is_alive() and not engine.committer.failed
    assert engine.committer.committed == 4096
    pools = [cache.data_ptr() for cache in engine.kv_caches]
    assert _anon_huge_bytes(pools) == 2 * half_bytes * len(pools)
    again = llm.generate(PROMPTS, params, use_tqdm=False)  # the pool still holds its blocks
    assert [o.outputs[0].token_ids for o in again] == _generate(tiny_dir, "start", monkeypatch)


def test_the_default_commits_ahead(tiny_dir, monkeypatch):
    monkeypatch.delenv(KV_POOL_COMMIT_ENV, raising=False)
    llm = LLM(str(tiny_dir), num_kv_blocks=64, block_size=8, dtype="float32")
    assert llm.llm_engine.worker.cache_engine.committer is not None
