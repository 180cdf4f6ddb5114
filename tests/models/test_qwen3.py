"""Qwen3 (`Qwen3ForCausalLM`): greedy tokens equal transformers' generate on tiny random
models (per-head q/k norms; head_dim apart from hidden / heads; biases or not)."""

from __future__ import annotations

import pytest
from family_tests import TINY_BASE, check_bf16, check_fp32, tiny_model_builder

BASE = {**TINY_BASE, "head_dim": 32}
CONFIGS = {
    # Qwen3's release shape: GQA, no biases, a tied head.
    "gqa-tied": {"num_key_value_heads": 2, "tie_word_embeddings": True},
    # Biases on q/k/v/o (attention_bias), an untied head.
    "bias-untied": {"num_key_value_heads": 4, "attention_bias": True, "tie_word_embeddings": False},
}


@pytest.fixture(scope="module")
def qwen3_dir(tokenizer_dir, tmp_path_factory):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    return tiny_model_builder(Qwen3Config, Qwen3ForCausalLM, BASE, CONFIGS, tokenizer_dir,
                              tmp_path_factory)


def test_gqa_tied_under_a_small_pool_matches_transformers(qwen3_dir):
    check_fp32(qwen3_dir("gqa-tied"), num_kv_blocks=24)


@pytest.mark.slow
def test_biases_match_transformers(qwen3_dir):
    check_fp32(qwen3_dir("bias-untied"))


def test_bfloat16_stays_within_transformers_top3(qwen3_dir):
    check_bf16(qwen3_dir("gqa-tied"))
