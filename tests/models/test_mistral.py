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


def test_no_window_matches_transformers(mistral_dir):
    check_fp32(mistral_dir("no-window-tied"))


def test_bfloat16_stays_within_transformers_top3(mistral_dir):
    check_bf16(mistral_dir("window-16-gqa"))


def test_transformers_honours_the_window(mistral_dir):
    """The reference really slides: without its window, transformers' own tokens change."""
    from family_tests import MAX_TOKENS, PROMPTS, expected_tokens
    from hf_reference import hf_greedy, load_hf_model

    model_dir = mistral_dir("window-16-gqa")
    model = load_hf_model(model_dir)
    model.config.sliding_window = None
    assert hf_greedy(model, PROMPTS, MAX_TOKENS) != expected_tokens(model_dir)
