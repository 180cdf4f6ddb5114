"""Greedy tokens of pagedllm equal transformers' generate on tiny random Llama models."""

from __future__ import annotations

import random

import pytest
from hf_reference import (
    check_outputs_equal,
    hf_greedy,
    load_hf_model,
    ragged_prompts,
    token_prompts,
)

from pagedllm import LLM, SamplingParams

CONFIGS = {
    "mha-untied-default-rope": dict(num_heads=4, num_kv_heads=4, tie_word_embeddings=False),
    "gqa-tied-default-rope": dict(num_heads=4, num_kv_heads=2, tie_word_embeddings=True),
    "gqa-untied-theta-500k": dict(
        num_heads=8,
        num_kv_heads=2,
        rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
    ),
    "mqa-tied-llama3-rope": dict(
        num_heads=4,
        num_kv_heads=1,
        tie_word_embeddings=True,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 50000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
    ),
}
GREEDY = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_32_ragged_requests_match_transformers(tiny_llama_factory, name):
    model_dir = tiny_llama_factory(**CONFIGS[name])
    prompts = ragged_prompts(32, seed=1)
    expected = hf_greedy(load_hf_model(model_dir), prompts, GREEDY.max_tokens)
    llm = LLM(str(model_dir), num_kv_blocks=400, block_size=8)
    outputs = llm.generate(token_prompts(prompts), GREEDY, use_tqdm=False)
    check_outputs_equal(expected, [o.outputs[0].token_ids for o in outputs])
    assert all(o.outputs[0].finish_reason == "length" for o in outputs)
    assert llm.llm_engine.get_stats().num_free_blocks == 400


def test_requests_added_mid_decode_match_transformers(tiny_llama_factory):
    model_dir = tiny_llama_factory(**CONFIGS["gqa-tied-default-rope"])
    prompts = ragged_prompts(12, seed=2)
    expected = hf_greedy(load_hf_model(model_dir), prompts, GREEDY.max_tokens)
    engine = LLM(str(model_dir), num_kv_blocks=200, block_size=16).llm_engine
    finished = {}
    # Four waves: each new wave arrives while the earlier ones are mid-decode.
    for wave in range(4):
        for i in range(wave * 3, wave * 3 + 3):
            engine.add_request(str(i), {"prompt_token_ids": prompts[i]}, GREEDY)
        for _ in range(5):
            for out in engine.step():
                if out.finished:
                    finished[out.request_id] = out
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out
    actual = [finished[str(i)].outputs[0].token_ids for i in range(12)]
    check_outputs_equal(expected, actual)


@pytest.mark.parametrize("block_size", [1, 8, 32])
def test_preemption_under_a_small_pool_gives_identical_outputs(tiny_llama_factory, block_size):
    model_dir = tiny_llama_factory(**CONFIGS["mha-untied-default-rope"])
    prompts = ragged_prompts(16, seed=3, max_len=40)
    params = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)
    roomy = LLM(str(model_dir), num_kv_blocks=4096 // block_size, block_size=block_size)
    expected = [o.outputs[0].token_ids for o in roomy.generate(token_prompts(prompts), params,
                                                                use_tqdm=False)]
    # Room for about three requests at a time: the rest must wait or be preempted.
    tight = LLM(str(model_dir), num_kv_blocks=max(80 // block_size * 3, 3), block_size=block_size)
    actual = [o.outputs[0].token_ids for o in tight.generate(token_prompts(prompts), params,
                                                              use_tqdm=False)]
    stats = tight.llm_engine.get_stats()
    assert stats.num_preemptions > 0
    check_outputs_equal(expected, actual)
    assert stats.num_free_blocks == stats.num_blocks
    assert stats.num_tokens_stored == 0 and stats.num_slots_reserved == 0


def test_long_prompt_is_prefilled_in_chunks(tiny_llama_factory):
    model_dir = tiny_llama_factory(**CONFIGS["gqa-untied-theta-500k"])
    prompts = ragged_prompts(3, seed=4, max_len=5)
    prompts[1] = [random.Random(5).randrange(3, 512) for _ in range(150)]
    expected = hf_greedy(load_hf_model(model_dir), prompts, GREEDY.max_tokens)
    llm = LLM(str(model_dir), num_kv_blocks=100, max_num_batched_tokens=32)
    engine = llm.llm_engine
    for i, p in enumerate(prompts):
        engine.add_request(str(i), {"prompt_token_ids": p}, GREEDY)
    chunk_sizes, finished = [], {}
    while engine.has_unfinished_requests():
        long_request = engine.scheduler.requests.get("1")
        long_seq = long_request.seqs[0] if long_request else None
        before = long_seq.num_computed_tokens if long_seq else None
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out
        if before is not None and before < 150 and long_seq.num_computed_tokens > before:
            chunk_sizes.append(long_seq.num_computed_tokens - before)
    # The 150-token prompt shared 32-token budgets with the others' prefills and decodes.
    assert sum(chunk_sizes) == 150 and len(chunk_sizes) >= 5 and max(chunk_sizes) <= 32
    check_outputs_equal(expected, [finished[str(i)].outputs[0].token_ids for i in range(3)])


def test_bfloat16_weights_and_cache_follow_transformers(tiny_llama_factory):
    """bf16 rounds differently in every kernel, so tokens may part ways after a while; each
    token we pick must still be among transformers' three most likely at that point."""
    import torch

    model_dir = tiny_llama_factory(**CONFIGS["gqa-tied-default-rope"])
    llm = LLM(str(model_dir), dtype="bfloat16", num_kv_blocks=64)
    assert llm.llm_engine.worker.cache_engine.kv_caches[0].dtype == torch.bfloat16
    assert next(llm.llm_engine.worker.model.parameters()).dtype == torch.bfloat16
    hf = load_hf_model(model_dir, dtype=torch.bfloat16)
    for prompt in ragged_prompts(4, seed=6):
        out = llm.generate({"prompt_token_ids": prompt}, GREEDY, use_tqdm=False)[0]
        tokens = out.outputs[0].token_ids
        with torch.no_grad():
            logits = hf(torch.tensor([prompt + tokens])).logits[0, len(prompt) - 1 : -1]
        top3 = logits.float().topk(3).indices
        for step, token in enumerate(tokens[:8]):
            assert token in top3[step].tolist(), f"step {step}"
