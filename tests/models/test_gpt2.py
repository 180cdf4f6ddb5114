"""GPT-2 (`GPT2LMHeadModel`): greedy tokens equal transformers' generate on tiny random models."""

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
    # GPT-2 as released: tied head, gelu_new, attention scaled by head_size**-0.5.
    "tied-gelu-tanh": dict(),
    # An untied head, exact GELU, a narrower MLP and the per-layer 1/(layer + 1) scale.
    "untied-gelu-layer-scaled": dict(tie_word_embeddings=False, activation_function="gelu",
                                     n_inner=96, scale_attn_by_inverse_layer_idx=True),
}
MAX_TOKENS = 32
PROMPTS = ragged_prompts(10, seed=11)


@pytest.fixture(scope="module")
def gpt2_dir(tokenizer_dir, tmp_path_factory):
    """gpt2_dir(name) -> a tiny random GPT-2 directory of CONFIGS[name], built once."""
    from transformers import GPT2Config, GPT2LMHeadModel

    @functools.cache
    def build(name: str):
        config = GPT2Config(vocab_size=512, n_embd=64, n_layer=2, n_head=4, n_positions=256,
                            bos_token_id=1, eos_token_id=2, pad_token_id=2, **CONFIGS[name])
        return save_tiny_model(GPT2LMHeadModel(config), tmp_path_factory.mktemp(name),
                               tokenizer_dir)

    return build


@functools.cache
def _expected(model_dir) -> list[list[int]]:
    return hf_greedy(load_hf_model(model_dir), PROMPTS, MAX_TOKENS)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_a_ragged_batch_matches_transformers(gpt2_dir, name):
    model_dir = gpt2_dir(name)
    check_family_against_transformers(model_dir, PROMPTS, MAX_TOKENS, _expected(model_dir),
                                      num_kv_blocks=200)


def test_preemption_under_a_small_pool_matches_transformers(gpt2_dir):
    model_dir = gpt2_dir("tied-gelu-tanh")
    # 24 blocks of 8 tokens: two or three of the up to 92-token requests at a time.
    check_family_against_transformers(model_dir, PROMPTS, MAX_TOKENS, _expected(model_dir),
                                      num_kv_blocks=24)


def test_bfloat16_stays_within_transformers_top3(gpt2_dir):
    model_dir = gpt2_dir("untied-gelu-layer-scaled")
    check_family_against_transformers(model_dir, PROMPTS, MAX_TOKENS, None, num_kv_blocks=200,
                                      dtype="bfloat16")
