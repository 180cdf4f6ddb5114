"""Gemma 2 (`Gemma2ForCausalLM`): greedy tokens equal transformers' generate on tiny random
models (scaled embeddings, (1 + w) norms around both blocks, GELU-tanh, query_pre_attn_scalar,
soft-capped scores and logits, sliding-window layers interleaved with global ones)."""

from __future__ import annotations

import pytest
from family_tests import TINY_BASE, check_bf16, check_fp32, tiny_model_builder

BASE = {**TINY_BASE, "head_dim": 16, "query_pre_attn_scalar": 24}
CONFIGS = {
    # Gemma 2's shape: layers alternate a 16-key window (layer 0) and global attention
    # (layer 1), scores capped at 5, logits at 10; GQA, a tied head.
    "window-softcap-gqa": {"num_key_value_heads": 2, "sliding_window": 16,
                           "attn_logit_softcapping": 5.0, "final_logit_softcapping": 10.0},
    # No caps, both layers global, MQA, an untied head.
    "no-caps-untied": {"num_key_value_heads": 1, "layer_types": ["full_attention"] * 2,
                       "attn_logit_softcapping": None, "final_logit_softcapping": None,
                       "tie_word_embeddings": False},
}


@pytest.fixture(scope="module")
def gemma2_dir(tokenizer_dir, tmp_path_factory):
    from transformers import Gemma2Config, Gemma2ForCausalLM

    return tiny_model_builder(Gemma2Config, Gemma2ForCausalLM, BASE, CONFIGS, tokenizer_dir,
                              tmp_path_factory)


def test_window_and_soft_caps_under_a_small_pool_match_transformers(gemma2_dir):
    check_fp32(gemma2_dir("window-softcap-gqa"), num_kv_blocks=24)


@pytest.mark.slow
def test_no_caps_untied_matches_transformers(gemma2_dir):
    check_fp32(gemma2_dir("no-caps-untied"))


@pytest.mark.slow
def test_bfloat16_stays_within_transformers_top3(gemma2_dir):
    check_bf16(gemma2_dir("window-softcap-gqa"))
