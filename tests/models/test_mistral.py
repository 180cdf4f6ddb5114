"""Mistral (`MistralForCausalLM`): greedy tokens equal transformers' generate on tiny random
models, one with a sliding window shorter than most prompts."""

from __future__ import annotations

import pytest
from family_tests import TINY_BASE, check_bf16, check_fp32, tiny_model_builder

CONFIGS = {
    # Every layer attends to its last 16 positions (prompts are up to 60 tokens, +32); GQA.
    "window-16-gqa": {"sliding_window": 16, "num_key_value_heads": 2, "tie_word_embeddings": False},
    # No window, a tied head, head_dim set apart from hidden / heads.
    "no-window-tied": {"sliding_window": None, "num_key_value_heads": 4, "head_dim": 32,
                       "tie_word_embeddings": True},
}


@pytest.fixture(scope="module")
def mistral_dir(tokenizer_dir, tmp_path_factory):
    from transformers import MistralConfig, MistralForCausalLM

    return tiny_model_builder(MistralConfig, MistralForCausalLM, TINY_BASE, CONFIGS,
                              tokenizer_dir, tmp_path_factory)


def test_a_sliding_window_under_a_small_pool_matches_transformers(mistral_dir):
    # 24 blocks of 8 tokens: a few of the up to 92-token requests at a time (preempted).
    check_fp32(mistral_dir("window-16-gqa"), num_kv_blocks=24)


@pytest.mark.slow
def test_no_window_matches_transformers(mistral_dir):
    check_fp32(mistral_dir("no-window-tied"))


def test_bfloat16_stays_within_transformers_top3(mistral_dir):
    check_bf16(mistral_dir("window-16-gqa"))


@pytest.mark.slow
def test_transformers_honours_the_window(mistral_dir):
    """The reference really slides: without its window, transformers' own tokens change."""
    from family_tests import MAX_TOKENS, PROMPTS, expected_tokens
    from hf_reference import hf_greedy, load_hf_model

    model_dir = mistral_dir("window-16-gqa")
    model = load_hf_model(model_dir)
    model.config.sliding_window = None
    assert hf_greedy(model, PROMPTS, MAX_TOKENS) != expected_tokens(model_dir)


def test_blocks_out_of_the_window_return_to_the_pool(mistral_dir):
    """A sequence running far past its window (40 + 60 positions, 16 seen) holds only the blocks the window reaches: the
    pool's free blocks grow back as it advances, and its tokens still match transformers."""
    from hf_reference import hf_greedy, load_hf_model

    from pagedllm import LLM, SamplingParams

    model_dir = mistral_dir("window-16-gqa")
    prompt = list(range(3, 43))  # 40 tokens: 5 blocks of 8, 3 of them before the window
    llm = LLM(str(model_dir), dtype="float32", num_kv_blocks=200, block_size=8)
    engine = llm.llm_engine
    engine.add_request("long", {"prompt_token_ids": prompt},
                       SamplingParams(temperature=0.0, max_tokens=60, ignore_eos=True))
    free, tokens = [], None
    while engine.has_unfinished_requests():
        for out in engine.step():
            tokens = out.outputs[0].token_ids
        free.append(engine.get_stats().num_free_blocks)
    # The prefill takes 5 blocks; from the first decode step on, the blocks wholly before the
    # 16-key window go back: 3 blocks at most are held (the window spans up to 3 blocks of 8).
    used = [200 - f for f in free]
    assert used[0] == 5 and max(used[1:]) == 3 and used[-1] == 0, used
    assert tokens == hf_greedy(load_hf_model(model_dir), [prompt], 60)[0]
