"""The checks every family's test file runs on its tiny random configs: greedy fp32 equal to
transformers token for token over 8 ragged prompts x 32 tokens in one batch (one config under
a pool small enough to preempt), bf16 within transformers' top-3.

NOTE: the default run keeps each family's most featureful config (and the cheap bf16 checks);
the others are marked slow (`make test-slow`) to keep the default run's cost down."""

from __future__ import annotations

import functools
from pathlib import Path

from hf_reference import (
    check_family_against_transformers,
    hf_greedy,
    load_hf_model,
    ragged_prompts,
    save_tiny_model,
)

# A 2-layer, 64-wide model over the first 512 token ids of the shipped tokenizer.
TINY_BASE = {"vocab_size": 512, "hidden_size": 64, "intermediate_size": 128,
             "num_hidden_layers": 2, "num_attention_heads": 4, "max_position_embeddings": 256,
             "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}
MAX_TOKENS = 32
PROMPTS = ragged_prompts(8, seed=13)


def tiny_model_builder(config_cls, model_cls, base: dict, configs: dict, tokenizer_dir: Path,
                       tmp_path_factory):
    """build(name) -> a tiny random model directory of base + configs[name], built once."""

    @functools.cache
    def build(name: str) -> Path:
        config = config_cls(**{**base, **configs[name]})
        return save_tiny_model(model_cls(config), tmp_path_factory.mktemp(name), tokenizer_dir)

    return build


@functools.cache
def expected_tokens(model_dir: Path) -> list[list[int]]:
    return hf_greedy(load_hf_model(model_dir), PROMPTS, MAX_TOKENS)


def check_fp32(model_dir: Path, num_kv_blocks: int = 200) -> None:
    check_family_against_transformers(model_dir, PROMPTS, MAX_TOKENS, expected_tokens(model_dir),
                                      num_kv_blocks=num_kv_blocks)


def check_bf16(model_dir: Path) -> None:
    check_family_against_transformers(model_dir, PROMPTS, MAX_TOKENS, None, num_kv_blocks=200,
                                      dtype="bfloat16")
