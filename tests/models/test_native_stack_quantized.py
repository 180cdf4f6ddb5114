"""The native decoder stack on quantized layers (its quantized path): int8 rows and GGUF blocks,
a fused projection's parts in different GGUF types included. Every step's hidden states and KV
cache writes must equal the per-module path's bit for bit (both call the same kernels on the
same activations); a layer with a float part keeps the module path."""

from __future__ import annotations

import pytest
from hf_reference import ragged_prompts, token_prompts
from test_native_stack_families import check_both_paths
from test_quantized import write_tiny_llama_gguf

from pagedllm import LLM, SamplingParams
from pagedllm.layers.quantization.gguf import PANEL_FORMAT, GGUFLinearMethod
from pagedllm.layers.quantization.int8 import Int8LinearMethod
from pagedllm.models.llama_stack import INT8_FORMAT, QUANTIZED
from pagedllm.ops import cpu_ops

pytestmark = pytest.mark.skipif(cpu_ops() is None, reason="the quantized kernels need the ops")

# The GGUF types' ids as the layers run them: repacked into panels (quant_panels.cpp).
Q8_0, Q4_0, Q4_1 = (PANEL_FORMAT + t for t in (8, 2, 3))


def model_of(llm: LLM):
    return llm.llm_engine.worker.model


def run_both_paths(monkeypatch, llm: LLM) -> list[int]:
    rows = check_both_paths(monkeypatch, model_of(llm))
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    llm.generate(token_prompts(ragged_prompts(6, seed=9, max_len=50)), params, use_tqdm=False)
    llm.generate(token_prompts(ragged_prompts(1, seed=10, max_len=20)), params, use_tqdm=False)
    return rows


@pytest.mark.parametrize("bits", ["8", "16"])  # W8A8 panels (the default), 16-bit rows
@pytest.mark.parametrize("dtype", ["float32", pytest.param("bfloat16", marks=pytest.mark.slow)])
def test_int8_steps_match_the_module_path_bit_for_bit(tiny_llama_factory, monkeypatch, dtype,
                                                      bits):
    monkeypatch.setenv("PAGEDLLM_INT8_ACTIVATION_BITS", bits)
    model_dir = tiny_llama_factory(num_kv_heads=2, attention_bias=True, mlp_bias=True, seed=5)
    llm = LLM(str(model_dir), dtype=dtype, quantization="int8", num_kv_blocks=128,
              block_size=8, max_num_batched_tokens=64)
    model = model_of(llm)
    assert type(model.layers[0].self_attn.qkv_proj.linear_method) is Int8LinearMethod
    assert model.layers[0].self_attn.qkv_proj.int8_scales.dim() == (3 if bits == "8" else 2)
    stack = model.native_stack
    assert stack.linear_path(1) == stack.linear_path(64) == QUANTIZED
    assert set(stack.quant_layout[1::3]) == {INT8_FORMAT}  # one run per projection
    rows = run_both_paths(monkeypatch, llm)
    assert {1, 64} <= set(rows)


@pytest.mark.parametrize("dtype", [pytest.param("float32", marks=pytest.mark.slow), "bfloat16"])
def test_gguf_steps_match_the_module_path_bit_for_bit(tmp_path, monkeypatch, dtype):
    # q and k in Q8_0, v in Q4_0: the fused qkv projection runs as two kernel calls.
    path = tmp_path / "tiny-llama.gguf"
    write_tiny_llama_gguf(path, {"attn_v": "Q4_0", "ffn_gate": "Q4_1", "ffn_up": "Q4_1"})
    llm = LLM(str(path), dtype=dtype, quantization="auto", num_kv_blocks=128, block_size=8,
              max_num_batched_tokens=64)
    model = model_of(llm)
    assert type(model.layers[0].self_attn.qkv_proj.linear_method) is GGUFLinearMethod
    stack = model.native_stack
    assert stack.linear_path(7) == QUANTIZED
    # Per layer: qkv (Q8_0 for q | k, Q4_0 for v), o (Q8_0), gate_up (Q4_1), down (Q8_0).
    q_k, kv = 64 + 32, 32
    layer = [2, Q8_0, q_k, Q4_0, kv, 1, Q8_0, 64, 1, Q4_1, 256, 1, Q8_0, 64]
    assert stack.quant_layout == layer * 2
    rows = run_both_paths(monkeypatch, llm)
    assert {1, 64} <= set(rows)


@pytest.mark.slow
def test_a_gguf_float_part_keeps_the_module_path(tmp_path):
    """Q5_1 has no kernel: its layers hold dequantized float parts, which the op lacks."""
    path = tmp_path / "tiny-llama-q5_1.gguf"
    write_tiny_llama_gguf(path, {"ffn_down": "Q5_1"})
    llm = LLM(str(path), quantization="auto", num_kv_blocks=32, block_size=8)
    model = model_of(llm)
    (run,) = model.layers[0].mlp.down_proj.gguf_runs
    assert run.ggml_type is None  # a float part
    assert model.native_stack is None


@pytest.mark.slow
def test_a_gguf_q5_0_part_runs_on_the_stack_as_q8_0(tmp_path, monkeypatch):
    """Q5_0 is widened at load into Q8_0 blocks of the same values (gguf_loader.q5_0_as_q8_0):
    no float part, so the stack runs it, bit for bit as the module path."""
    path = tmp_path / "tiny-llama-q5_0.gguf"
    write_tiny_llama_gguf(path, {"ffn_down": "Q5_0"})
    llm = LLM(str(path), dtype="bfloat16", quantization="auto", num_kv_blocks=128, block_size=8,
              max_num_batched_tokens=64)
    stack = model_of(llm).native_stack
    assert stack.linear_path(7) == QUANTIZED
    # Per layer: qkv, o, gate_up, down (Q5_0 widened): one Q8_0 run each.
    layer = [1, Q8_0, 64 + 32 + 32, 1, Q8_0, 64, 1, Q8_0, 256, 1, Q8_0, 64]
    assert stack.quant_layout == layer * 2
    rows = run_both_paths(monkeypatch, llm)
    assert {1, 64} <= set(rows)
