"""The engine on a CUDA device: the same tokens as transformers, sharing, swap and prefix caching.

Skipped where no GPU is visible (CI); run on a GPU machine with `pytest tests/engine/test_cuda_device.py`.
"""

from __future__ import annotations

import random

import pytest
import torch
from hf_reference import (
    check_outputs_equal,
    hf_greedy,
    load_hf_model,
    ragged_prompts,
    token_prompts,
)

from pagedllm import LLM, BeamSearchParams, SamplingParams

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

GREEDY = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)


@pytest.fixture(scope="module")
def tiny_dir(tiny_llama_factory):
    return tiny_llama_factory(num_heads=4, num_kv_heads=2, tie_word_embeddings=True)


def completions(outputs) -> list[list[list[int]]]:
    return [[c.token_ids for c in o.outputs] for o in outputs]


@needs_cuda
def test_greedy_on_cuda_matches_transformers(tiny_dir):
    prompts = ragged_prompts(24, seed=11)
    expected = hf_greedy(load_hf_model(tiny_dir), prompts, GREEDY.max_tokens)
    llm = LLM(str(tiny_dir), device="cuda", num_kv_blocks=300, block_size=16)
    assert llm.llm_engine.worker.cache_engine.kv_caches[0].device.type == "cuda"
    outputs = llm.generate(token_prompts(prompts), GREEDY, use_tqdm=False)
    check_outputs_equal(expected, [o.outputs[0].token_ids for o in outputs])
    assert llm.llm_engine.get_stats().num_free_blocks == 300


@needs_cuda
def test_default_pool_is_sized_from_free_gpu_memory(tiny_dir):
    llm = LLM(str(tiny_dir), device="cuda")
    stats = llm.llm_engine.get_stats()
    spec_bytes = llm.llm_engine.worker.cache_engine.spec.bytes_per_block
    free, total = torch.cuda.mem_get_info()
    # The pool took GPU memory, not host RAM, and left some free.
    assert stats.num_blocks * spec_bytes > (1 << 30)
    assert free > 0 and stats.num_blocks * spec_bytes < total
    out = llm.generate(token_prompts(ragged_prompts(2, seed=3)), GREEDY, use_tqdm=False)
    assert all(len(o.outputs[0].token_ids) == GREEDY.max_tokens for o in out)


@needs_cuda
@pytest.mark.parametrize("mode", ["swap", "recompute"])
def test_preemption_on_cuda_gives_identical_outputs(tiny_dir, mode):
    prompts = token_prompts(ragged_prompts(12, seed=3, max_len=40))
    params = [
        SamplingParams(n=3, temperature=0.9, seed=i, max_tokens=24, ignore_eos=True)
        if i % 3 == 0 else GREEDY
        for i in range(len(prompts))
    ]
    roomy = LLM(str(tiny_dir), device="cuda", num_kv_blocks=1024, block_size=8)
    expected = completions(roomy.generate(prompts, params, use_tqdm=False))
    tight = LLM(str(tiny_dir), device="cuda", num_kv_blocks=24, block_size=8,
                preemption_mode=mode, swap_space=0.01, enable_prefix_caching=False)
    actual = completions(tight.generate(prompts, params, use_tqdm=False))
    stats = tight.llm_engine.get_stats()
    assert stats.num_preemptions > 0
    assert (stats.num_swap_outs > 0) == (mode == "swap")
    assert actual == expected
    assert stats.num_free_blocks == stats.num_blocks
    assert stats.num_free_cpu_blocks == stats.num_cpu_blocks


@needs_cuda
def test_cuda_matches_cpu_for_logprobs_prefix_hits_and_beams(tiny_dir):
    rng = random.Random(5)
    shared = [rng.randrange(3, 512) for _ in range(100)]
    prompts = token_prompts([shared + [rng.randrange(3, 512) for _ in range(rng.randint(1, 9))]
                         for _ in range(6)])
    greedy = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True, logprobs=2)
    beams = BeamSearchParams(beam_width=3, max_tokens=8, ignore_eos=True)
    results = {}
    for device in ("cpu", "cuda"):
        llm = LLM(str(tiny_dir), device=device, num_kv_blocks=256, block_size=16,
                  attention_backend="torch_paged")
        # The first request fills the prefix cache; the rest hit it.
        outputs = llm.generate(prompts[:1], greedy, use_tqdm=False)
        outputs += llm.generate(prompts[1:], greedy, use_tqdm=False)
        hits = llm.llm_engine.get_stats().prefix_cache_hits
        beam_out = llm.beam_search(prompts[:2], beams)
        top_ids = [[sorted(step) for step in o.outputs[0].logprobs] for o in outputs]
        results[device] = (
            completions(outputs),
            top_ids,
            [[s.tokens for s in b.sequences] for b in beam_out],
            hits,
        )
    assert results["cuda"] == results["cpu"]
    assert results["cuda"][3] == 5 * 96


@needs_cuda
def test_seeded_parallel_samples_on_cuda_are_reproducible(tiny_dir):
    llm = LLM(str(tiny_dir), device="cuda", num_kv_blocks=256, block_size=8)
    prompt = {"prompt_token_ids": list(range(5, 66))}
    params = SamplingParams(n=4, temperature=1.0, seed=42, max_tokens=12, ignore_eos=True)
    alone = llm.generate(prompt, params, use_tqdm=False)[0]
    assert len({tuple(c.token_ids) for c in alone.outputs}) == 4
    batched = llm.generate([token_prompts(ragged_prompts(1, 1))[0], prompt],
                           [SamplingParams(max_tokens=5), params], use_tqdm=False)[1]
    assert completions([batched]) == completions([alone])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without a GPU")
def test_cuda_without_a_gpu_is_a_clear_error():
    from pagedllm import EngineConfig

    with pytest.raises(ValueError, match="sees no CUDA device"):
        EngineConfig(model="unused", device="cuda")


def test_unknown_devices_are_refused():
    from pagedllm import EngineConfig

    for device in ("tpu:0", "gpu", 3):
        with pytest.raises(ValueError, match="device"):
            EngineConfig(model="unused", device=device)
