"""Packed linear layers (oneDNN, and the few-rows streaming kernel) against F.linear."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pagedllm.layers import linear as linear_module
from pagedllm.layers.linear import FEW_ROWS, Linear, pack_linear_layers
from pagedllm.ops import cpu_ops

ROWS = [1, 3, FEW_ROWS, FEW_ROWS + 1, 64]  # the streaming kernel, its edge, oneDNN


def _reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    # A bf16 GEMM: bf16 operands, fp32 accumulation, one rounding of the result.
    out = F.linear(x.float(), weight.float(), None if bias is None else bias.float())
    return out.to(x.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("bias", [False, True])
def test_packed_linear_matches_f_linear(dtype: torch.dtype, rows: int, bias: bool) -> None:
    torch.manual_seed(rows)
    # in=100 leaves a tail after the 8-lane steps; out=37 leaves one after the row tiles.
    layer = Linear(100, 37, bias=bias).to(dtype)
    weight = layer.weight.detach().clone()
    bias_t = None if layer.bias is None else layer.bias.detach().clone()
    assert layer.pack()
    assert layer.weight.numel() == 0  # the packed copy replaced the plain parameter
    x = torch.randn(rows, 100).to(dtype)
    got = layer(x)
    assert got.dtype == dtype and got.shape == (rows, 37)
    tol = {"rtol": 1e-5, "atol": 1e-4} if dtype == torch.float32 else {"rtol": 1e-2, "atol": 1e-2}
    torch.testing.assert_close(got, _reference(x, weight, bias_t), **tol)


def test_few_rows_take_the_streaming_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    if cpu_ops() is None:
        pytest.skip("CPU ops unavailable")
    layer = Linear(64, 16, bias=False)
    layer.pack()
    calls = []
    real = layer.packed.ops

    class Spy:
        def linear_few_rows(self, *args):
            calls.append(args[1].shape[0])
            return real.linear_few_rows(*args)

    monkeypatch.setattr(layer.packed, "ops", Spy())
    layer(torch.randn(FEW_ROWS, 64))
    layer(torch.randn(FEW_ROWS + 1, 64))
    assert calls == [FEW_ROWS]


def test_pack_linear_layers_skips_what_onednn_cannot_take(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    model = torch.nn.Sequential(Linear(8, 8), Linear(8, 4), torch.nn.Linear(4, 2))
    assert pack_linear_layers(model) == 2  # plain nn.Linear is not ours to pack
    monkeypatch.setattr(linear_module.torch.backends.mkldnn, "is_available", lambda: False)
    other = Linear(8, 8)
    assert not other.pack() and other.packed is None and other.weight.numel() == 64
