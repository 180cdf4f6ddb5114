"""Phi-3 (`Phi3ForCausalLM`): greedy tokens equal transformers' generate on tiny random models
(fused qkv and gate_up checkpoints split on load; default RoPE and LongRoPE)."""

from __future__ import annotations

import pytest
from family_tests import TINY_BASE, check_bf16, check_fp32, tiny_model_builder

CONFIGS = {
    # Phi-3-mini-4k's kind: default RoPE; here GQA and an untied head.
    "default-rope-gqa": {"num_key_value_heads": 2, "tie_word_embeddings": False},
    # Phi-3-mini-128k's kind: LongRoPE, 128 original positions of 512 (so an attention factor
    # of sqrt(1 + ln 4 / ln 128)); the requests (up to 92 tokens) stay on the short factors.
    # NOTE: past the original length transformers recomputes the whole sequence with the long
    # factors (Phi3ForCausalLM.prepare_inputs_for_generation), which a paged cache does not.
    "longrope": {"num_key_value_heads": 4, "max_position_embeddings": 512,
                 "original_max_position_embeddings": 128,
                 "rope_parameters": {"rope_type": "longrope", "rope_theta": 10000.0,
                                     "short_factor": [1.0 + 0.1 * i for i in range(8)],
                                     "long_factor": [2.0 + 0.5 * i for i in range(8)],
                                     "original_max_position_embeddings": 128}},
}


@pytest.fixture(scope="module")
def phi3_dir(tokenizer_dir, tmp_path_factory):
    from transformers import Phi3Config, Phi3ForCausalLM

    return tiny_model_builder(Phi3Config, Phi3ForCausalLM, TINY_BASE, CONFIGS,
                              tokenizer_dir, tmp_path_factory)


def test_default_rope_under_a_small_pool_matches_transformers(phi3_dir):
    check_fp32(phi3_dir("default-rope-gqa"), num_kv_blocks=24)


@pytest.mark.slow
def test_longrope_matches_transformers(phi3_dir):
    check_fp32(phi3_dir("longrope"))


def test_bfloat16_stays_within_transformers_top3(phi3_dir):
    check_bf16(phi3_dir("default-rope-gqa"))
