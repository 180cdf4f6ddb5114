"""The host KV pool committed at start or lazily (PAGEDLLM_KV_POOL_COMMIT): the same tokens
either way, the lazy pool resident only where blocks were written, and a pool the host cannot
hold refused at start in both modes."""

from __future__ import annotations

import os

import pytest
import torch

from pagedllm import LLM, SamplingParams
from pagedllm.worker.cache_engine import KV_POOL_COMMIT_ENV
from pagedllm.worker.host_memory import huge_page_reserved

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
