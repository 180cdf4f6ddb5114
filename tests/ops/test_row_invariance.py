"""Per-row ops give a row the same bits whatever batch it is in (1 row or 300).

Each op runs over a batch of random rows that contains one fixed row at a random place; that
row's output must equal, bit for bit, its output when it runs alone. The row counts cross every
switch point a row count selects (few-rows passes, panel GEMM, register-tile remainders, row
blocks, oneDNN). tests/engine/test_batch_invariance.py checks the property end to end.
"""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig

from pagedllm.layers.activation import silu_and_mul
from pagedllm.layers.linear import Linear
from pagedllm.layers.norm import RMSNorm
from pagedllm.layers.rotary import RotaryEmbedding
from pagedllm.ops import cpu_ops, cpu_ops_error
from pagedllm.sample.sampler import Sampler, SamplingBatch
from pagedllm.sampling_params import SamplingParams

DTYPES = [torch.float32, torch.bfloat16]
ROWS = [1, 2, 3, 6, 7, 8, 9, 13, 64, 129, 300]


@pytest.fixture(autouse=True)
def _need_ops() -> None:
    if cpu_ops() is None:
        pytest.skip(f"CPU ops unavailable: {cpu_ops_error()}")


def batches_around(row: torch.Tensor, seed: int):
    """(batch, index of `row` in it) for each row count of ROWS."""
    gen = torch.Generator().manual_seed(seed)
    for rows in ROWS:
        batch = torch.randn(rows, *row.shape, generator=gen).to(row.dtype)
        index = int(torch.randint(rows, (1,), generator=gen))
        batch[index] = row
        yield batch, index


def assert_row_invariant(op, row: torch.Tensor, seed: int = 0) -> None:
    """op(batch)[i] == op(row alone) for row at index i of every batch size."""
    alone = op(row.unsqueeze(0).clone())[0]
    for batch, index in batches_around(row, seed):
        got = op(batch)[index]
        assert torch.equal(got, alone), (
            f"{batch.shape[0]} rows: max difference {(got.float() - alone.float()).abs().max()}")


def packed_linear(in_features: int, out_features: int, dtype: torch.dtype, bias: bool,
                  gates_swiglu: bool = False) -> Linear:
    torch.manual_seed(in_features + out_features)
    layer = Linear(in_features, out_features, bias=bias).to(dtype)
    layer.gates_swiglu = gates_swiglu
    assert layer.pack()
    return layer


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [False, True])
# 576 x 1728: SmolLM2's qkv projection (K a multiple of the chunks); 100 x 37: tails everywhere;
# 1030 x 40: K past several register-tile chunks.
@pytest.mark.parametrize("in_features,out_features", [(576, 1728), (100, 37), (1030, 40)])
def test_linear_row_is_batch_invariant(dtype, bias, in_features, out_features) -> None:
    layer = packed_linear(in_features, out_features, dtype, bias)
    row = torch.randn(in_features).to(dtype)
    assert_row_invariant(layer, row)
    # The LM head's fp32 logits.
    assert_row_invariant(lambda x: layer.packed(x, out_dtype=torch.float32), row)


@pytest.mark.parametrize("dtype", DTYPES)
def test_gated_projections_are_batch_invariant(dtype) -> None:
    # SwiGLU: the gate_up projection gated (in its GEMM or by the separate op), and the down
    # projection over the gate (fused into its input packing, or after the separate op).
    gate_up = packed_linear(96, 2 * 80, dtype, bias=True, gates_swiglu=True)
    assert_row_invariant(gate_up.swiglu, torch.randn(96).to(dtype))
    down = packed_linear(80, 96, dtype, bias=False)
    assert_row_invariant(down.after_silu_and_mul, (torch.randn(160) * 3).to(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_layer_ops_are_batch_invariant(dtype) -> None:
    norm = RMSNorm(576, 1e-5).to(dtype)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    row = torch.randn(576).to(dtype)
    assert_row_invariant(norm, row)

    def add_norm(x: torch.Tensor) -> torch.Tensor:
        residual = x.flip(-1).clone()
        out, residual = norm(x.clone(), residual)
        return torch.cat([out, residual], dim=-1)

    assert_row_invariant(add_norm, row)
    assert_row_invariant(silu_and_mul, (torch.randn(2 * 100) * 3).to(dtype))

    config = LlamaConfig(hidden_size=576, num_attention_heads=9, num_key_value_heads=3,
                         max_position_embeddings=512)
    rope = RotaryEmbedding(config, 64, 512).to(dtype)

    def rotate(x: torch.Tensor) -> torch.Tensor:  # x: [tokens, 12 * 64]: 9 q heads, 3 k heads
        q, k = x.view(-1, 12, 64).clone().split([9, 3], dim=1)
        q, k = q.contiguous(), k.contiguous()
        positions = torch.arange(x.shape[0]) * 7 % 512
        positions[:] = 300  # every row at the same position, so any index can be compared
        q, k = rope(positions, q, k)
        return torch.cat([q.flatten(1), k.flatten(1)], dim=-1)

    assert_row_invariant(rotate, torch.randn(12 * 64).to(dtype))


def sample_rows(logits: torch.Tensor, params: list[SamplingParams], index: int):
    batch = SamplingBatch(
        params=params,
        prompt_token_ids=[[5, 6, 7]] * len(params),
        output_token_ids=[[8, 9]] * len(params),
        min_tokens_stop_ids=[[]] * len(params),
    )
    out = Sampler(seed=0)(logits, batch)
    return (out.sampled_token_ids[index], out.sampled_logprobs[index],
            out.sampled_ranks[index], out.top_logprobs[index])


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=0, logprobs=5),
    SamplingParams(temperature=0.7, seed=3, logprobs=2, top_p=0.9, top_k=50),
    SamplingParams(temperature=1.0, seed=4, best_of=2, n=1),  # the chosen logprob alone
    SamplingParams(temperature=0),
], ids=["greedy-logprobs", "seeded-top-p-k", "best-of", "greedy"])
def test_sampler_row_is_batch_invariant(params: SamplingParams) -> None:
    gen = torch.Generator().manual_seed(0)
    vocab = 49152
    row = torch.randn(vocab, generator=gen) * 4
    others = [SamplingParams(temperature=0), SamplingParams(temperature=1.0, logprobs=1),
              SamplingParams(temperature=0.5, seed=9, repetition_penalty=1.2)]
    alone = sample_rows(row.unsqueeze(0).clone(), [params], 0)
    for rows in (2, 9, 64):
        logits = torch.randn(rows, vocab, generator=gen) * 4
        index = rows // 2
        logits[index] = row
        batch_params = [others[i % len(others)] for i in range(rows)]
        batch_params[index] = params
        assert sample_rows(logits, batch_params, index) == alone, rows
