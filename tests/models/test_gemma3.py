"""Gemma 3 text (`Gemma3ForCausalLM`, `Gemma3TextConfig`): greedy tokens equal transformers'
generate on tiny random models (Gemma 2's layers plus per-head q/k norms and a RoPE base of
their own for the sliding-window layers; a window shorter than the prompts)."""

from __future__ import annotations

import pytest
from family_tests import TINY_BASE, check_bf16, check_fp32, tiny_model_builder

ROPE = {"sliding_attention": {"rope_type": "default", "rope_theta": 100.0},
        "full_attention": {"rope_type": "default", "rope_theta": 10000.0}}
BASE = {**TINY_BASE, "head_dim": 16, "query_pre_attn_scalar": 24, "rope_parameters": ROPE}
CONFIGS = {
    # Gemma 3's pattern cut to 2 layers: a 16-key window with the local RoPE base, then a
    # global layer; GQA, a tied head.
    "window-gqa": {"num_key_value_heads": 2, "sliding_window": 16,
                   "layer_types": ["sliding_attention", "full_attention"]},
    # Both layers global, MHA, an untied head, a score cap that Gemma 3 ignores (transformers'
    # Gemma 3 attention never applies attn_logit_softcapping).
    "global-untied": {"num_key_value_heads": 4, "layer_types": ["full_attention"] * 2,
                      "tie_word_embeddings": False, "attn_logit_softcapping": 5.0},
}


@pytest.fixture(scope="module")
def gemma3_dir(tokenizer_dir, tmp_path_factory):
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    return tiny_model_builder(Gemma3TextConfig, Gemma3ForCausalLM, BASE, CONFIGS, tokenizer_dir,
                              tmp_path_factory)


def test_window_under_a_small_pool_matches_transformers(gemma3_dir):
    check_fp32(gemma3_dir("window-gqa"), num_kv_blocks=24)


@pytest.mark.slow
def test_global_untied_matches_transformers(gemma3_dir):
    check_fp32(gemma3_dir("global-untied"))


@pytest.mark.slow
def test_bfloat16_stays_within_transformers_top3(gemma3_dir):
    check_bf16(gemma3_dir("window-gqa"))
