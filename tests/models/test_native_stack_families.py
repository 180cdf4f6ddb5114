"""The native decoder stack on the families built on Llama's layers: Mistral (sliding windows),
Qwen2 (q/k/v biases, windows on some layers), Qwen3 (per-head q/k norms), Phi-3 (default RoPE
and LongRoPE).

Each model must build its stack and run every step through it; each step's hidden states and
KV cache writes must equal the per-module path's bit for bit, and greedy fp32 tokens must equal
transformers'.
"""

from __future__ import annotations

import pytest
import torch
from family_tests import MAX_TOKENS, PROMPTS, TINY_BASE, expected_tokens, tiny_model_builder
from hf_reference import check_outputs_equal, greedy_token_ids, token_prompts

from pagedllm import LLM, SamplingParams
from pagedllm.models.llama import LlamaForCausalLM
from pagedllm.ops import cpu_ops

pytestmark = pytest.mark.skipif(cpu_ops() is None, reason="the C++ CPU ops are unavailable")


def _mistral(tokenizer_dir, tmp_path_factory):
    from test_mistral import CONFIGS
    from transformers import MistralConfig, MistralForCausalLM

    return tiny_model_builder(MistralConfig, MistralForCausalLM, TINY_BASE, CONFIGS,
                              tokenizer_dir, tmp_path_factory)


def _qwen2(tokenizer_dir, tmp_path_factory):
    from test_qwen2 import CONFIGS
    from transformers import Qwen2Config, Qwen2ForCausalLM

    return tiny_model_builder(Qwen2Config, Qwen2ForCausalLM, TINY_BASE, CONFIGS,
                              tokenizer_dir, tmp_path_factory)


def _qwen3(tokenizer_dir, tmp_path_factory):
    from test_qwen3 import BASE, CONFIGS
    from transformers import Qwen3Config, Qwen3ForCausalLM

    return tiny_model_builder(Qwen3Config, Qwen3ForCausalLM, BASE, CONFIGS, tokenizer_dir,
                              tmp_path_factory)


def _phi3(tokenizer_dir, tmp_path_factory):
    from test_phi3 import CONFIGS
    from transformers import Phi3Config, Phi3ForCausalLM

    return tiny_model_builder(Phi3Config, Phi3ForCausalLM, TINY_BASE, CONFIGS, tokenizer_dir,
                              tmp_path_factory)


BUILDERS = {"mistral": _mistral, "qwen2": _qwen2, "qwen3": _qwen3, "phi3": _phi3}
# (family, config): each family's most featureful tiny config.
CASES = [("mistral", "window-16-gqa"), ("qwen2", "window-layer-1"), ("qwen3", "bias-untied"),
         ("phi3", "default-rope-gqa"), ("phi3", "longrope")]
slow = pytest.mark.slow
# NOTE: the default run keeps a few (the family test files' fp32 checks run on the stack too).
BIT_FOR_BIT = [
    pytest.param("mistral", "window-16-gqa", "float32"),
    pytest.param("mistral", "window-16-gqa", "bfloat16", marks=slow),
    pytest.param("qwen2", "window-layer-1", "float32", marks=slow),
    pytest.param("qwen2", "window-layer-1", "bfloat16"),
    pytest.param("qwen3", "bias-untied", "float32"),
    pytest.param("qwen3", "bias-untied", "bfloat16"),
    pytest.param("phi3", "default-rope-gqa", "float32", marks=slow),
    pytest.param("phi3", "default-rope-gqa", "bfloat16", marks=slow),
    pytest.param("phi3", "longrope", "float32", marks=slow),
    pytest.param("phi3", "longrope", "bfloat16"),
]
TRANSFORMERS = [pytest.param(*case, marks=[] if case[0] in ("mistral", "qwen3") else slow)
                for case in CASES]


@pytest.fixture(scope="module")
def family_dir(tokenizer_dir, tmp_path_factory):
    builders = {}

    def build(family: str, name: str):
        if family not in builders:
            builders[family] = BUILDERS[family](tokenizer_dir, tmp_path_factory)
        return builders[family](name)

    return build


def check_both_paths(monkeypatch, model: LlamaForCausalLM) -> list[int]:
    """Makes every forward run the stack and the module path on copies of the caches, assert
    they agree bit for bit, and go on with the module path's result; returns the rows of each
    step the stack ran."""
    stack = model.native_stack
    assert stack is not None, f"{type(model).__name__} must get the native stack"
    module_forward = LlamaForCausalLM.forward
    rows = []

    def both_paths(self, input_ids, positions, kv_caches, metadata):
        hidden = self.embed_tokens(input_ids)
        native_caches = [cache.clone() for cache in kv_caches]
        assert stack.applies(hidden, native_caches)
        native = stack(hidden, positions, native_caches, metadata)
        self.native_stack = None
        try:
            expected = module_forward(self, input_ids, positions, kv_caches, metadata)
        finally:
            self.native_stack = stack
        assert torch.equal(native, expected)
        for native_cache, cache in zip(native_caches, kv_caches):
            assert torch.equal(native_cache, cache)
        rows.append(input_ids.shape[0])
        return expected

    monkeypatch.setattr(type(model), "forward", both_paths)
    return rows


@pytest.mark.parametrize(("family", "name", "dtype"), BIT_FOR_BIT)
def test_every_step_matches_the_module_path_bit_for_bit(family_dir, monkeypatch, family, name,
                                                         dtype):
    llm = LLM(str(family_dir(family, name)), dtype=dtype, num_kv_blocks=128, block_size=8,
              max_num_batched_tokens=96)
    rows = check_both_paths(monkeypatch, llm.llm_engine.worker.model)
    # Chunked prefill (96-token budget) next to decodes, ragged lengths past the windows.
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    llm.generate(token_prompts(PROMPTS), params, use_tqdm=False)
    assert 1 < len(rows) and 96 in rows


def test_longrope_past_the_original_length_matches_the_module_path(family_dir, monkeypatch):
    """Positions from 128 on take LongRoPE's long factors in the table both paths read."""
    llm = LLM(str(family_dir("phi3", "longrope")), dtype="float32", num_kv_blocks=128,
              block_size=8)
    rows = check_both_paths(monkeypatch, llm.llm_engine.worker.model)
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    llm.generate(token_prompts([list(range(3, 123)), list(range(200, 230))]), params,
                 use_tqdm=False)
    assert len(rows) == 40


@pytest.mark.parametrize(("family", "name"), TRANSFORMERS)
def test_the_stack_runs_every_step_and_matches_transformers(family_dir, monkeypatch, family,
                                                            name):
    model_dir = family_dir(family, name)
    llm = LLM(str(model_dir), dtype="float32", num_kv_blocks=200, block_size=8)
    stack = llm.llm_engine.worker.model.native_stack
    assert stack is not None
    calls = []
    original_call = type(stack).__call__

    def counting_call(self, *args):
        calls.append(args[0].shape[0])
        return original_call(self, *args)

    monkeypatch.setattr(type(stack), "__call__", counting_call)
    outputs = greedy_token_ids(llm, PROMPTS, MAX_TOKENS)
    check_outputs_equal(expected_tokens(model_dir), outputs)
    # One prefill step for the batch and a decode step per further token, all on the stack.
    assert len(calls) == MAX_TOKENS


@pytest.mark.parametrize(("family", "name"), CASES)
def test_every_family_builds_the_stack(family_dir, family, name):
    model = LLM(str(family_dir(family, name)), num_kv_blocks=16,
                block_size=8).llm_engine.worker.model
    assert model.native_stack is not None, f"{family} ({name}) keeps the module path"


def test_the_stack_is_told_each_layers_window_and_head_norms(family_dir):
    qwen2 = LLM(str(family_dir("qwen2", "window-layer-1")), dtype="float32", num_kv_blocks=32,
                block_size=8).llm_engine.worker.model.native_stack
    assert qwen2.windows == [0, 16] and qwen2.head_norms == []
    qwen3 = LLM(str(family_dir("qwen3", "bias-untied")), dtype="float32", num_kv_blocks=32,
                block_size=8).llm_engine.worker.model
    stack = qwen3.native_stack
    assert stack.windows == [0, 0]
    attention = [layer.self_attn for layer in qwen3.layers]
    expected = [norm.weight for a in attention for norm in (a.q_norm, a.k_norm)]
    assert [w.data_ptr() for w in stack.head_norms] == [w.data_ptr() for w in expected]
