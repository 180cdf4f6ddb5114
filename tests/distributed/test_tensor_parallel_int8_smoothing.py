"""int8 with smoothing (W8A8) at tensor_parallel_size=2 loads the same model as at size 1:
every rank folds the same scales into its norms (the column-parallel q/k/v and gate/up share
them), and each rank's int8 shards of q/k/v, o, gate/up and down equal the matching slices of
the size-1 model's (the o/down scales, folded into v's and up's rows on the rank that holds
them); a tied LM head's int8 copy holds each rank's embedding rows as at size 1."""

from __future__ import annotations

import pytest
import torch

from pagedllm import LLM
from pagedllm.layers.quantization.int8 import (
    ACTIVATION_BITS_ENV,
    SMOOTHING_ENV,
    SMOOTHING_SEARCH_ENV,
)
from pagedllm.layers.quantization.int8_lm_head import LM_HEAD_ENV
from pagedllm.ops import cpu_ops

pytestmark = pytest.mark.skipif(cpu_ops() is None, reason="the W8A8 GEMM needs the ops")


def dequantized_panels(bytes_: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """pack_int8_panels' (bytes [N, Kp], scales [panels, groups, 32]) -> the weight [N, Kp]."""
    n, kp = bytes_.shape
    groups = scales.shape[1]
    flat, rows = bytes_.reshape(-1), []
    for n0 in range(0, n, 32):
        width = min(32, n - n0)
        rows.append(flat[n0 * kp:(n0 + width) * kp].view(kp // 4, width, 4).transpose(0, 1)
                    .reshape(width, kp))
    q = torch.cat(rows).to(torch.int16) - 128
    s = scales.transpose(1, 2).reshape(-1, groups)[:n]
    return (q.float().view(n, groups, -1) * s[:, :, None]).view(n, kp)


def rank_weights(worker) -> dict[str, torch.Tensor]:
    """On a rank: layer 0's norm weights and dequantized int8 projections (real inputs only),
    and the LM head's."""
    head = worker.model.lm_head
    layer = worker.model.layers[0]
    attn, mlp = layer.self_attn, layer.mlp
    out = {"input_norm": layer.input_layernorm.weight.detach().clone(),
           "post_norm": layer.post_attention_layernorm.weight.detach().clone()}
    for name, proj in (("qkv", attn.qkv_proj), ("o", attn.o_proj),
                       ("gate_up", mlp.gate_up_proj), ("down", mlp.down_proj)):
        weight = dequantized_panels(proj.int8_weight, proj.int8_scales)
        out[name] = weight[:, :proj.in_features]
    out["head"] = dequantized_panels(head.int8_weight, head.int8_scales)[:, :head.in_features]
    return out


def test_w8a8_smoothing_at_tp2_equals_tp1(tiny_llama_factory, monkeypatch) -> None:
    # The ranks inherit the settings: W8A8, every projection smoothed with alpha 0.5 (the
    # search would keep this random model's projections as they are).
    monkeypatch.setenv(ACTIVATION_BITS_ENV, "8")
    monkeypatch.setenv(SMOOTHING_ENV, "0.5")
    monkeypatch.setenv(SMOOTHING_SEARCH_ENV, "0")
    monkeypatch.setenv(LM_HEAD_ENV, "32")  # the tied head's int8 copy
    model_dir = tiny_llama_factory(num_heads=4, num_kv_heads=2, tie_word_embeddings=True, seed=9)
    kwargs = {"quantization": "int8", "dtype": "float32", "num_kv_blocks": 32,
              "block_size": 8}
    one = LLM(str(model_dir), **kwargs)
    full = rank_weights(one.llm_engine.model_executor.driver_worker)
    attn = one.llm_engine.model_executor.driver_worker.model.layers[0].self_attn
    q_size, kv_size = attn.q_size, attn.kv_size
    del one
    two = LLM(str(model_dir), tensor_parallel_size=2, **kwargs)
    try:
        ranks = two.llm_engine.model_executor.collective_rpc(rank_weights)
    finally:
        two.shutdown()
    intermediate = full["down"].shape[1]
    for rank, got in enumerate(ranks):
        assert torch.equal(got["input_norm"], full["input_norm"])
        assert torch.equal(got["post_norm"], full["post_norm"])
        assert not torch.equal(full["input_norm"], torch.ones_like(full["input_norm"]))
        # q: this rank's half of the query heads; k and v: its KV head (one of 2).
        q_rows = slice(rank * q_size // 2, (rank + 1) * q_size // 2)
        kv_rows = slice(rank * kv_size // 2, (rank + 1) * kv_size // 2)
        q, k, v = full["qkv"].split([q_size, kv_size, kv_size])
        assert torch.equal(got["qkv"], torch.cat([q[q_rows], k[kv_rows], v[kv_rows]]))
        cols = slice(rank * q_size // 2, (rank + 1) * q_size // 2)
        assert torch.equal(got["o"], full["o"][:, cols])
        units = slice(rank * intermediate // 2, (rank + 1) * intermediate // 2)
        gate, up = full["gate_up"].chunk(2)
        assert torch.equal(got["gate_up"], torch.cat([gate[units], up[units]]))
        assert torch.equal(got["down"], full["down"][:, units])
        vocab = full["head"].shape[0]
        assert torch.equal(got["head"], full["head"][rank * vocab // 2:(rank + 1) * vocab // 2])


def kept_kinds(worker) -> list[tuple[int, int, int]]:
    """On a rank: each projection's (weight bits, activation bits, group size), module order."""
    from pagedllm.layers.quantization.int8 import Int8LinearMethod

    return [(m.linear_method.weight_bits, m.linear_method.activation_bits,
             m.linear_method.group_size) for m in worker.model.modules()
            if isinstance(getattr(m, "linear_method", None), Int8LinearMethod)]


def test_sensitive_choice_at_tp2_equals_tp1(tiny_llama_factory, monkeypatch) -> None:
    """The projections kept as 16-bit weights (PAGEDLLM_INT8_SENSITIVE) are the same ones on
    both ranks at tensor_parallel_size=2 as at size 1 (the errors summed over the ranks)."""
    from pagedllm.layers.quantization.int8 import SENSITIVE_ENV

    monkeypatch.setenv(ACTIVATION_BITS_ENV, "8")
    monkeypatch.setenv("PAGEDLLM_INT8_GROUP_SIZE", "32")
    monkeypatch.setenv(SENSITIVE_ENV, "w16=0.4")
    model_dir = tiny_llama_factory(num_heads=4, num_kv_heads=2, seed=9)
    kwargs = {"quantization": "int8", "dtype": "float32", "num_kv_blocks": 32,
              "block_size": 8}
    one = LLM(str(model_dir), **kwargs)
    full = kept_kinds(one.llm_engine.model_executor.driver_worker)
    del one
    assert {(16, 8, 32), (8, 8, 32)} == set(full)
    two = LLM(str(model_dir), tensor_parallel_size=2, **kwargs)
    try:
        ranks = two.llm_engine.model_executor.collective_rpc(kept_kinds)
    finally:
        two.shutdown()
    assert ranks == [full, full]
