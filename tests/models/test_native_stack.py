"""The native decoder stack (one C++ call per step) against the per-module forward.

Both run the same fused ops in the same order, so every step's hidden states and KV cache
writes must agree bit for bit; the engine's tokens then agree with transformers as the
per-module path's do (tests/models/test_tiny_llama.py runs with the stack on by default).
"""

from __future__ import annotations

import pytest
import torch
from hf_reference import (
    check_outputs_equal,
    hf_greedy,
    load_hf_model,
    ragged_prompts,
    token_prompts,
)

from pagedllm import LLM, SamplingParams
from pagedllm.layers.linear import (
    AMX_PANELS,
    DOT_PANELS,
    FP32_PANEL_MAX_ROWS,
    PANELS,
    amx_kernel_applies,
    dot_kernel_applies,
)
from pagedllm.models.llama import LlamaForCausalLM
from pagedllm.models.llama_stack import PART_NAMES
from pagedllm.ops import cpu_ops

pytestmark = pytest.mark.skipif(cpu_ops() is None, reason="the C++ CPU ops are unavailable")

CONFIGS = {
    "gqa-tied": dict(num_heads=4, num_kv_heads=2, tie_word_embeddings=True),
    "mha-biases-3-layers": dict(num_heads=4, num_kv_heads=4, attention_bias=True,
                                mlp_bias=True, num_layers=3),
}


def model_of(llm: LLM) -> LlamaForCausalLM:
    return llm.llm_engine.worker.model


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_every_step_matches_the_module_path_bit_for_bit(tiny_llama_factory, monkeypatch, name,
                                                         dtype):
    llm = LLM(str(tiny_llama_factory(**CONFIGS[name])), dtype=dtype, num_kv_blocks=128,
              block_size=8, max_num_batched_tokens=160)
    model = model_of(llm)
    stack = model.native_stack
    assert stack is not None, "a packed CPU model must get the native stack"
    module_forward = LlamaForCausalLM.forward
    rows_checked, paths = [], set()

    def both_paths(self, input_ids, positions, kv_caches, metadata):
        native_caches = [cache.clone() for cache in kv_caches]
        assert stack.applies(self.embed_tokens(input_ids), native_caches)
        native = stack(self.embed_tokens(input_ids), positions, native_caches, metadata)
        self.native_stack = None
        try:
            expected = module_forward(self, input_ids, positions, kv_caches, metadata)
        finally:
            self.native_stack = stack
        assert torch.equal(native, expected)
        for native_cache, cache in zip(native_caches, kv_caches):
            assert torch.equal(native_cache, cache)
        rows_checked.append(input_ids.shape[0])
        paths.add(stack.linear_path(input_ids.shape[0]))
        return expected

    monkeypatch.setattr(LlamaForCausalLM, "forward", both_paths)
    # Chunked prefill (160-token budget) next to decodes, ragged lengths, several blocks each.
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    llm.generate(token_prompts(ragged_prompts(10, seed=3, max_len=70)), params, use_tqdm=False)
    one_row_steps = token_prompts(ragged_prompts(1, seed=5, max_len=30))
    llm.generate(one_row_steps, params, use_tqdm=False)
    assert {1, 10, 160} <= set(rows_checked)
    # Batch invariant: one path for every batch.
    if dtype == "bfloat16" and amx_kernel_applies():  # AMX: the AMX kernel
        assert paths == {AMX_PANELS}
    elif dtype == "bfloat16" and dot_kernel_applies():  # AVX512_BF16: the dot-product kernel
        assert paths == {DOT_PANELS}
    else:  # panels, in the weights' dtype
        assert paths == {PANELS}


def test_stack_is_the_default_and_matches_transformers(tiny_llama_factory, monkeypatch):
    model_dir = tiny_llama_factory(**CONFIGS["mha-biases-3-layers"])
    llm = LLM(str(model_dir), num_kv_blocks=200, block_size=16)
    stack = model_of(llm).native_stack
    calls = []
    original_call = type(stack).__call__

    def counting_call(self, *args):
        calls.append(args[0].shape[0])
        return original_call(self, *args)

    monkeypatch.setattr(type(stack), "__call__", counting_call)
    prompts = ragged_prompts(8, seed=4, max_len=40)
    expected = hf_greedy(load_hf_model(model_dir), prompts, 16)
    outputs = llm.generate(token_prompts(prompts), SamplingParams(temperature=0, max_tokens=16,
                                                   ignore_eos=True), use_tqdm=False)
    check_outputs_equal(expected, [o.outputs[0].token_ids for o in outputs])
    assert len(calls) == 16  # one prefill step and 15 decode steps, all through the stack


def test_module_path_where_a_part_is_not_native(tiny_llama_factory):
    model_dir = tiny_llama_factory(**CONFIGS["gqa-tied"])
    # The reference attention backend was asked for: the stack would bypass it.
    reference = LLM(str(model_dir), num_kv_blocks=64, block_size=8,
                    attention_backend="torch_paged")
    assert model_of(reference).native_stack is None
    # A batch in another dtype than the model's, or a cache the kernel does not take.
    stack = model_of(LLM(str(model_dir), num_kv_blocks=64, block_size=8)).native_stack
    kv_caches = [torch.zeros(2, 64, 8, 2, 16)] * 2
    hidden = torch.zeros(FP32_PANEL_MAX_ROWS + 1, 64)
    assert stack.applies(hidden, kv_caches)
    assert not stack.applies(hidden.bfloat16(), kv_caches)  # not the model's dtype
    assert not stack.applies(hidden, [torch.zeros(2, 64, 8, 2, 16, dtype=torch.float16)] * 2)


def test_profile_times_the_stack_by_part(tiny_llama_factory):
    llm = LLM(str(tiny_llama_factory(**CONFIGS["gqa-tied"])), num_kv_blocks=64, block_size=8,
              profile=True)
    assert model_of(llm).native_stack is not None
    llm.generate(token_prompts(ragged_prompts(3, seed=6, max_len=20)),
                 SamplingParams(temperature=0, max_tokens=4, ignore_eos=True), use_tqdm=False)
    seconds = llm.llm_engine.profiler.seconds
    assert all(seconds[name] > 0 for name in PART_NAMES), dict(seconds)
    blocks = seconds["attention block"] + seconds["mlp"]
    assert blocks == pytest.approx(sum(seconds[name] for name in PART_NAMES[2:]), rel=1e-9)
    assert seconds["forward"] >= blocks
