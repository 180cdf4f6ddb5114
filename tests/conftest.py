"""Shared fixtures: the shipped SmolLM2 model and tiny random-weight Llama models built on the fly."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja")

# The packed-weight cache and the config records go to one folder per test session (servers
# started by tests inherit it), not into the user's cache folder beside the converted models.
_SESSION_CACHE = tempfile.mkdtemp(prefix="pagedllm-test-cache-")
atexit.register(shutil.rmtree, _SESSION_CACHE, True)
os.environ.setdefault("PAGEDLLM_PACKED_WEIGHT_CACHE_DIR", os.path.join(_SESSION_CACHE, "packed"))
os.environ.setdefault("PAGEDLLM_HF_RECORD_DIR", os.path.join(_SESSION_CACHE, "hf_records"))


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The default model as a Hugging Face directory (converted from the GGUF once, cached)."""
    from pagedllm.models.default_model import resolve_model_path

    return resolve_model_path(None)


def make_tiny_llama(
    path: Path,
    tokenizer_dir: Path,
    *,
    num_heads: int = 4,
    num_kv_heads: int = 4,
    tie_word_embeddings: bool = False,
    rope_parameters: dict | None = None,
    num_layers: int = 2,
    hidden_size: int = 64,
    vocab_size: int = 512,
    max_position_embeddings: int = 512,
    attention_bias: bool = False,
    mlp_bias: bool = False,
    seed: int = 0,
) -> Path:
    """Saves a random-weight LlamaForCausalLM plus SmolLM2's tokenizer into `path`.

    NOTE: weights are drawn with a large std so that logits are peaked: greedy decoding of a
    near-uniform distribution would hinge on float rounding and compare nothing useful.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=tie_word_embeddings,
        attention_bias=attention_bias,
        mlp_bias=mlp_bias,
        rope_parameters=rope_parameters or {"rope_type": "default", "rope_theta": 10000.0},
        initializer_range=0.15,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(path)
    for name in TOKENIZER_FILES:
        if (tokenizer_dir / name).exists():
            shutil.copy(tokenizer_dir / name, path / name)
    return path


@pytest.fixture(scope="session")
def tokenizer_dir(request) -> Path:
    """SmolLM2's tokenizer for the tiny models; PAGEDLLM_TEST_TOKENIZER_DIR names a folder
    holding only its files, for machines without the shipped GGUF (a lent GPU machine)."""
    override = os.environ.get("PAGEDLLM_TEST_TOKENIZER_DIR")
    if override:
        return Path(override)
    return request.getfixturevalue("smollm2_dir")


@pytest.fixture(scope="session")
def tiny_llama_factory(tokenizer_dir, tmp_path_factory):
    """Builds (and caches per session) tiny Llama directories keyed by their settings."""
    cache: dict[tuple, Path] = {}

    def factory(**kwargs) -> Path:
        key = tuple(sorted((k, repr(v)) for k, v in kwargs.items()))
        if key not in cache:
            path = tmp_path_factory.mktemp("tiny-llama")
            cache[key] = make_tiny_llama(path, tokenizer_dir, **kwargs)
        return cache[key]

    return factory
