"""OPT (`OPTForCausalLM`): greedy tokens equal transformers' generate on tiny random models."""

from __future__ import annotations

import functools

import pytest
from hf_reference import (
    check_family_against_transformers,
    hf_greedy,
    load_hf_model,
    ragged_prompts,
    save_tiny_model,
)

CONFIGS = {
    # OPT-125m and up: norms before each block, a final norm; here an untied head without
    # biases.
    "norm-before-untied-no-bias": dict(tie_word_embeddings=False, enable_bias=False),
    # OPT-350m: norms after each block, no final norm, and 32-wide embeddings projected in
    # and out of the 64-wide decoder; tied head.
    "norm-after-projected": dict(do_layer_norm_before=False, word_embed_proj_dim=32),
}
MAX_TOKENS = 32
PROMPTS = ragged_prompts(10, seed=12)


@pytest.fixture(scope="module")
def opt_dir(tokenizer_dir, tmp_path_factory):
    """opt_dir(name) -> a tiny random OPT directory of CONFIGS[name], built once."""
    from transformers import OPTConfig, OPTForCausalLM

    @functools.cache
    def build(name: str):
        config = OPTConfig(vocab_size=512, hidden_size=64, num_hidden_layers=2,
                           num_attention_heads=4, ffn_dim=128, max_position_embeddings=256,
                           bos_token_id=1, eos_token_id=2, pad_token_id=2, **CONFIGS[name])
        return save_tiny_model(OPTForCausalLM(config), tmp_path_factory.mktemp(name),
                               tokenizer_dir)

    return build


@functools.cache
def _expected(model_dir) -> list[list[int]]:
    return hf_greedy(load_hf_model(model_dir), PROMPTS, MAX_TOKENS)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_a_ragged_batch_matches_transformers(opt_dir, name):
    model_dir = opt_dir(name)
    check_family_against_transformers(model_dir, PROMPTS, MAX_TOKENS, _expected(model_dir),
                                      num_kv_blocks=200)


def test_preemption_under_a_small_pool_matches_transformers(opt_dir):
    model_dir = opt_dir("norm-after-projected")
    # 24 blocks of 8 tokens: two or three of the up to 92-token requests at a time.
    check_family_against_transformers(model_dir, PROMPTS, MAX_TOKENS, _expected(model_dir),
                                      num_kv_blocks=24)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_bfloat16_stays_within_transformers_top3(opt_dir, name):
    model_dir = opt_dir(name)
    check_family_against_transformers(model_dir, PROMPTS, MAX_TOKENS, None, num_kv_blocks=200,
                                      dtype="bfloat16")
