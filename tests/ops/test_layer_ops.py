"""The fused C++ layer ops against the torch code they replace (same module, op switched off)."""

from __future__ import annotations

import pytest
import torch

from pagedllm.layers import activation, norm, rotary
from pagedllm.layers.activation import silu_and_mul
from pagedllm.layers.norm import RMSNorm
from pagedllm.layers.rotary import RotaryEmbedding
from pagedllm.ops import cpu_ops, cpu_ops_error, native_ops
from transformers import LlamaConfig

DTYPES = [torch.float32, torch.bfloat16]


@pytest.fixture(autouse=True)
def _need_ops() -> None:
    if cpu_ops() is None:
        pytest.skip(f"CPU ops unavailable: {cpu_ops_error()}")


@pytest.fixture
def torch_path(monkeypatch: pytest.MonkeyPatch):
    """Runs a callable with the native ops switched off (the torch code path)."""

    def run(fn, *args):
        with monkeypatch.context() as m:
            for module in (activation, norm, rotary):
                m.setattr(module, "native_ops", lambda *t: None)
            return fn(*args)

    return run


def _tolerance(dtype: torch.dtype) -> dict:
    # fp32: reduction order differs; bf16: one bf16 ulp where an fp32 intermediate rounds
    # differently.
    return {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 8e-3, "atol": 8e-3}


# Widths for the SIMD loops (two vectors, one vector, scalar tail): 5 and 13 a tail, 96 pairs
# of vectors, 107 all three on 8 lanes; 576 is SmolLM2's hidden size.
NORM_WIDTHS = [5, 13, 96, 107, 576]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 7, 64])
@pytest.mark.parametrize("width", NORM_WIDTHS)
def test_rms_norm(dtype: torch.dtype, rows: int, width: int, torch_path) -> None:
    layer = RMSNorm(width, 1e-5).to(dtype)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(width))
    x = torch.randn(rows, width).to(dtype) * 3
    expected = torch_path(layer, x)
    got = layer(x)
    assert got.dtype == dtype and got.shape == x.shape
    torch.testing.assert_close(got, expected, **_tolerance(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("width", NORM_WIDTHS)
def test_fused_add_rms_norm_updates_the_residual(dtype: torch.dtype, width: int,
                                                 torch_path) -> None:
    layer = RMSNorm(width, 1e-6).to(dtype)
    with torch.no_grad():
        layer.weight.copy_(torch.rand(width) + 0.5)
    x = torch.randn(33, width).to(dtype)
    residual = torch.randn(33, width).to(dtype)
    expected_out, expected_residual = torch_path(layer, x.clone(), residual.clone())
    got_out, got_residual = layer(x.clone(), residual.clone())
    torch.testing.assert_close(got_residual, expected_residual, rtol=0, atol=0)  # one rounding
    torch.testing.assert_close(got_out, expected_out, **_tolerance(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("width", [8, 13, 1536])  # a SIMD multiple, a scalar tail, SmolLM2's
def test_silu_and_mul(dtype: torch.dtype, width: int, torch_path) -> None:
    x = (torch.randn(40, 2 * width) * 4).to(dtype)
    x[0, :3] = torch.tensor([-100.0, 100.0, 0.0]).to(dtype)  # saturated exp and zero
    expected = torch_path(silu_and_mul, x)
    got = silu_and_mul(x)
    torch.testing.assert_close(got, expected, **_tolerance(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_size", [6, 16, 20, 64])  # scalar only, vector, both, SmolLM2's
def test_rotary_on_views_of_a_fused_projection(dtype: torch.dtype, head_size: int,
                                               torch_path) -> None:
    """q and k are strided views of the qkv output, as in the model; they rotate in place."""
    d = head_size
    config = LlamaConfig(hidden_size=4 * d, num_attention_heads=4, num_key_value_heads=2)
    rope = RotaryEmbedding(config, head_size=d, max_position=256).to(dtype)
    positions = torch.tensor([0, 1, 2, 200, 5, 255])
    qkv = torch.randn(6, 4 * d + 2 * 2 * d).to(dtype)

    def rotate(qkv: torch.Tensor):
        q, k, _ = qkv.split([4 * d, 2 * d, 2 * d], dim=-1)
        return rope(positions, q.view(6, 4, d), k.view(6, 2, d))

    expected_q, expected_k = torch_path(rotate, qkv.clone())
    fused = qkv.clone()
    got_q, got_k = rotate(fused)
    torch.testing.assert_close(got_q, expected_q, **_tolerance(dtype))
    torch.testing.assert_close(got_k, expected_k, **_tolerance(dtype))
    torch.testing.assert_close(fused[:, 6 * d:], qkv[:, 6 * d:], rtol=0, atol=0)  # v untouched


def test_rotary_rejects_positions_past_the_table() -> None:
    config = LlamaConfig(hidden_size=32, num_attention_heads=2, num_key_value_heads=2)
    rope = RotaryEmbedding(config, head_size=16, max_position=8)
    q, k = torch.randn(1, 2, 16), torch.randn(1, 2, 16)
    with pytest.raises(RuntimeError, match="out of range"):
        rope(torch.tensor([8]), q, k)


def test_other_devices_and_dtypes_take_the_torch_path() -> None:
    assert native_ops(torch.randn(2, 4, dtype=torch.float16)) is None
    assert native_ops(torch.randn(4, 2).t()) is None  # last dim not contiguous
    assert native_ops(torch.randn(2, 4)) is cpu_ops()
