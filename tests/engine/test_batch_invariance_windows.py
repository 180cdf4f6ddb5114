"""Batch invariance on a family with sliding windows, through the native decoder stack: a tiny
Qwen2 whose second layer slides over 200 positions (the 520-token target's windowed rows skip
most of its keys) gives its request the same bf16 bits in a crowd, prefilled in chunks among
others and after a prefix-cache hit (the scenarios of test_batch_invariance.py)."""

from __future__ import annotations

import pytest
from test_batch_invariance import check_scenarios

from pagedllm import LLM
from pagedllm.ops import cpu_ops


@pytest.fixture(scope="module")
def qwen2_window_dir(tokenizer_dir, tmp_path_factory) -> str:
    from hf_reference import save_tiny_model
    from transformers import Qwen2Config, Qwen2ForCausalLM

    # Head size 64 (the bf16 dot-product attention paths), two query heads per kv head.
    config = Qwen2Config(vocab_size=512, hidden_size=256, intermediate_size=512,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=1024, use_sliding_window=True,
                         sliding_window=200, max_window_layers=1, tie_word_embeddings=True,
                         bos_token_id=1, eos_token_id=2, pad_token_id=2)
    return str(save_tiny_model(Qwen2ForCausalLM(config), tmp_path_factory.mktemp("qwen2-window"),
                               tokenizer_dir))


@pytest.mark.skipif(cpu_ops() is None, reason="the C++ CPU ops are unavailable")
def test_windowed_qwen2_bf16_on_the_native_stack_is_batch_invariant(qwen2_window_dir) -> None:
    stack = LLM(qwen2_window_dir, dtype="bfloat16", num_kv_blocks=64,
                block_size=16).llm_engine.worker.model.native_stack
    assert stack is not None and stack.windows == [0, 200]
    check_scenarios(qwen2_window_dir, "bfloat16", "greedy", seed=7, num_others=5,
                    scenarios=("crowd", "chunked-crowd", "prefix-hit"))
