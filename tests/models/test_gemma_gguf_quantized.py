"""Gemma 2 and 3 GGUF files on the quantized path (models/gguf_loader.py): a tiny random model
of each written by the gguf package as llama.cpp's converters write them (Gemma's tensor
names, q/k rows not permuted, every RMSNorm weight stored as 1 + w), with the types the Gemma 3
Q4_K_M file mixes: Q8_0 (embedding and tied head), Q6_K, Q4_0/Q4_1, Q5_0 (widened into Q8_0 at
load) and Q5_1 (no kernel).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from pagedllm import LLM, SamplingParams
from pagedllm.layers.quantization.gguf import PANEL_FORMAT, GGUFEmbedding, GGUFLinearMethod
from pagedllm.ops import cpu_ops
from tests.hf_reference import ragged_prompts, token_prompts
from tests.models.test_quantized import (
    K_QUANT_HALF_FIELDS,
    check_within_dense_top3,
    linear_methods,
    model_of,
    random_k_blocks,
)

pytestmark = pytest.mark.skipif(cpu_ops() is None, reason="the quantized kernels need the ops")

# The Gemma 3 file's mix, by tensor kind (ffn_down's K-quant needs ffn a multiple of 256).
TYPES = {"attn_q": "Q4_0", "attn_k": "Q5_1", "attn_v": "Q8_0", "attn_output": "Q4_1",
         "ffn_gate": "Q5_0", "ffn_up": "Q5_0", "ffn_down": "Q6_K"}


def write_tiny_gemma_gguf(path: Path, arch: str, layers: int, seed: int = 0, hidden: int = 64,
                          ffn: int = 256, heads: int = 4, kv_heads: int = 2,
                          head_dim: int = 32) -> None:
    """A tiny random Gemma (`arch`: gemma2 or gemma3; tied embeddings, SmolLM2's tokenizer and
    vocabulary) as llama.cpp writes one, its matrices in TYPES (token_embd Q8_0)."""
    from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter
    from gguf.quants import quantize

    from pagedllm.models.default_model import default_gguf_path

    writer = GGUFWriter(path, arch=arch)
    for name, field in GGUFReader(default_gguf_path()).fields.items():
        if name.startswith(("GGUF.", "general.architecture", "llama.")):
            continue
        vtype = field.types[0]
        sub_type = field.types[-1] if vtype == GGUFValueType.ARRAY else None
        writer.add_key_value(name, field.contents(), vtype, sub_type=sub_type)
    writer.add_context_length(512)
    writer.add_embedding_length(hidden)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_rope_freq_base(10000.0)
    writer.add_sliding_window(16)  # shorter than the prompts: the windows are exercised
    gen = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)

    def matrix(rows: int, cols: int, std: float = 0.15) -> np.ndarray:
        return (torch.randn(rows, cols, generator=gen) * std).numpy()

    def norm(size: int) -> np.ndarray:  # llama.cpp's Gemma converters store 1 + w
        return (1 + 0.3 * matrix(1, size, 1)[0]).astype(np.float32)

    def add(name: str, w: np.ndarray, qtype_name: str = "Q8_0") -> None:
        qtype = GGMLQuantizationType[qtype_name]
        if qtype in K_QUANT_HALF_FIELDS:
            writer.add_tensor(name, random_k_blocks(qtype, *w.shape, rng), raw_dtype=qtype)
        else:
            writer.add_tensor(name, quantize(w.astype(np.float32), qtype), raw_dtype=qtype)

    add("token_embd.weight", matrix(49152, hidden, 0.5))
    q, kv = heads * head_dim, kv_heads * head_dim
    shapes = {"attn_q": (q, hidden), "attn_k": (kv, hidden), "attn_v": (kv, hidden),
              "attn_output": (hidden, q), "ffn_gate": (ffn, hidden), "ffn_up": (ffn, hidden),
              "ffn_down": (hidden, ffn)}
    for i in range(layers):
        for kind, shape in shapes.items():
            add(f"blk.{i}.{kind}.weight", matrix(*shape), TYPES[kind])
        for kind in ("attn_norm", "post_attention_norm", "ffn_norm", "post_ffw_norm"):
            writer.add_tensor(f"blk.{i}.{kind}.weight", norm(hidden))
        if arch == "gemma3":
            writer.add_tensor(f"blk.{i}.attn_q_norm.weight", norm(head_dim))
            writer.add_tensor(f"blk.{i}.attn_k_norm.weight", norm(head_dim))
    writer.add_tensor("output_norm.weight", norm(hidden))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def prompt_logprobs(llm: LLM, prompts: list[list[int]]) -> np.ndarray:
    """The log-probability of each prompt token after the first, teacher-forced."""
    params = SamplingParams(max_tokens=1, prompt_logprobs=0)
    return np.array([entry[token].logprob
                     for out in llm.generate(token_prompts(prompts), params)
                     for entry, token in zip(out.prompt_logprobs[1:], out.prompt_token_ids[1:])])


# Gemma 3: six layers, so both layer types (and both RoPE bases) run; Gemma 2 (two layers,
# the same names less the q/k norms) in the slow run only.
@pytest.mark.parametrize("arch, layers",
                         [("gemma3", 6), pytest.param("gemma2", 2, marks=pytest.mark.slow)])
def test_tiny_gemma_gguf_quantized_path(tmp_path, caplog, monkeypatch, arch, layers) -> None:
    """The file's blocks on the GGUF method (Q5_1 dequantized with one warning), the norms
    the dense path's (1 + w in the file), the prompts' log-probabilities the dense model's
    (the same dequantized values: the 16-bit activation blocks differ by ~5e-4 here, q/k rows
    in llama.cpp's rotary order by ~2), greedy tokens within the dense model's top-3. The
    layers' activations pinned to 16 bits (PAGEDLLM_GGUF_ACTIVATIONS, the default; 8 bits
    per 16 inputs move these random weights' log-probabilities by more than 0.02)."""
    monkeypatch.setenv("PAGEDLLM_GGUF_ACTIVATIONS", "16/32")
    path = tmp_path / f"tiny-{arch}.gguf"
    write_tiny_gemma_gguf(path, arch, layers)
    with caplog.at_level(logging.WARNING, logger="pagedllm.models.gguf_loader"):
        quantized = LLM(str(path), dtype="float32", quantization="auto", num_kv_blocks=64)
    warnings = [r.getMessage() for r in caplog.records if "no quantized kernel" in r.getMessage()]
    assert len(warnings) == 1 and "Q5_1" in warnings[0]
    model = model_of(quantized)
    assert isinstance(model.get_input_embeddings(), GGUFEmbedding)
    assert linear_methods(quantized) == {GGUFLinearMethod}
    for layer in model.layers:
        # gate | up (both Q5_0): one run of Q8_0 panels
        (run,) = layer.mlp.gate_up_proj.gguf_runs
        assert run.ggml_type == PANEL_FORMAT + 8
    prompts = ragged_prompts(4, seed=3, max_len=30)
    greedy = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    outputs = [o.outputs[0].token_ids for o in quantized.generate(token_prompts(prompts), greedy)]
    logprobs = prompt_logprobs(quantized, prompts)
    dense = LLM(str(path), dtype="float32", quantization="none", num_kv_blocks=64)
    np.testing.assert_allclose(logprobs, prompt_logprobs(dense, prompts), rtol=0, atol=0.02)
    dense_norms = {n: p for n, p in model_of(dense).named_parameters() if "norm" in n}
    norms = {n: p for n, p in model.named_parameters() if "norm" in n}
    assert len(norms) == (4 + 2 * (arch == "gemma3")) * layers + 1
    assert norms.keys() == dense_norms.keys()
    for name, weight in norms.items():
        torch.testing.assert_close(weight, dense_norms[name], rtol=0, atol=0, msg=name)
    check_within_dense_top3(dense, prompts, outputs)


@pytest.mark.slow  # two engines beside the reference: a minute or two on the shared machine
def test_a_gemma_gguf_request_is_batch_invariant(tmp_path) -> None:
    """bf16 on the quantized path (the panels, Q5_0 widened into Q8_0 panels, the dequantized
    Q5_1 packing, the Q8_0 tied head): a request's tokens and logprobs alone equal those among
    others of random lengths, and prefilled in chunks."""
    from engine.test_batch_invariance import crowd_failures

    path = tmp_path / "tiny-gemma3.gguf"
    write_tiny_gemma_gguf(path, "gemma3", 6)
    base = {"dtype": "bfloat16", "quantization": "auto", "block_size": 16, "num_kv_blocks": 256,
            "seed": 0}
    failures = crowd_failures(str(path), base)
    assert not failures, "\n".join(failures)


def test_q5_0_widened_into_q8_0_exactly() -> None:
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize, quantize

    from pagedllm.models.gguf_loader import q5_0_as_q8_0

    w = (torch.randn(33, 640, generator=torch.Generator().manual_seed(0)) * 3).numpy()
    q5 = quantize(w, GGMLQuantizationType.Q5_0)
    q8 = q5_0_as_q8_0(q5)
    assert q8.shape == (33, 640 // 32 * 34)
    np.testing.assert_array_equal(dequantize(q8, GGMLQuantizationType.Q8_0),
                                  dequantize(q5, GGMLQuantizationType.Q5_0))
