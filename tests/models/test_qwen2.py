"""Qwen2 (`Qwen2ForCausalLM`): greedy tokens equal transformers' generate on tiny random
models (q/k/v biases; GQA and a tied head; sliding-window layers)."""

from __future__ import annotations

import pytest
from family_tests import TINY_BASE, check_bf16, check_fp32, tiny_model_builder

CONFIGS = {
    # Qwen2.5-0.5B's shape: GQA, a tied head, no window.
    "gqa-tied": {"num_key_value_heads": 2, "tie_word_embeddings": True},
    # Layer 1 slides over 16 positions, layer 0 attends to everything; an untied head.
    "window-layer-1": {"num_key_value_heads": 4, "tie_word_embeddings": False,
                       "use_sliding_window": True, "sliding_window": 16, "max_window_layers": 1},
}


@pytest.fixture(scope="module")
def qwen2_dir(tokenizer_dir, tmp_path_factory):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    return tiny_model_builder(Qwen2Config, Qwen2ForCausalLM, TINY_BASE, CONFIGS,
                              tokenizer_dir, tmp_path_factory)


def test_gqa_tied_under_a_small_pool_matches_transformers(qwen2_dir):
    check_fp32(qwen2_dir("gqa-tied"), num_kv_blocks=24)


def test_sliding_window_layers_match_transformers(qwen2_dir):
    check_fp32(qwen2_dir("window-layer-1"))


def test_bfloat16_stays_within_transformers_top3(qwen2_dir):
    check_bf16(qwen2_dir("gqa-tied"))
