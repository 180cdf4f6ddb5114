"""The W8A8 int8 GEMM (ops/csrc/int8_gemm.cpp, pack_int8_panels): int8 weights in panels times
activations quantized per row to int8 in blocks of the weight's group size.

With activation quantization on, each output must lie within the bound that activation
rounding allows around x @ dequantize(W).T (each value moves at most half its block's step,
max |block| / 127 / 2); with it off (the test hook) it must equal that product. Every ISA the
build has (AVX512-VNNI, AVX2's VPMADDUBSW form, scalar) must give the same bits, and a row the
same bits alone as in any batch."""

from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch
import torch.nn.functional as F

from pagedllm.layers.quantization.int8 import int8_round_trip
from pagedllm.ops import cpu_ops

pytestmark = pytest.mark.skipif(cpu_ops() is None, reason="needs the CPU ops")

ISAS = ("avx512_vnni", "avx2", "scalar")


def isas() -> list[str]:
    """The kernels this build has, best first."""
    best = cpu_ops().int8_gemm_isa()
    return list(ISAS[ISAS.index(best):])


@contextmanager
def kernel_isa(name: str):
    cpu_ops().set_int8_gemm_isa(name)
    try:
        yield
    finally:
        cpu_ops().set_int8_gemm_isa("auto")


def activation_bound(x: torch.Tensor, w: torch.Tensor, group: int) -> torch.Tensor:
    """[M, N]: sum over blocks of (the block's step / 2) * sum |w| over the block's inputs."""
    k = x.shape[1]
    xp = F.pad(x.double(), (0, -k % 64)).reshape(x.shape[0], -1, group)
    wp = F.pad(w.double().abs(), (0, -k % 64)).reshape(w.shape[0], -1, group)
    step = xp.abs().amax(2) / 127
    return torch.einsum("mg,ng->mn", step / 2, wp.sum(2))


def check_product(x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor, w: torch.Tensor,
                  bias: torch.Tensor, bound: torch.Tensor, label) -> torch.Tensor:
    """int8_linear(x) within `bound` (plus fp32 rounding of the sums) of x @ w.T + bias, its
    last row alone the same bits as in the batch, and with the activations' quantization off
    (the hook) the exact product; returns the batch's output."""
    m, n = x.shape[0], w.shape[0]
    ref = x.double() @ w.double().T + bias.double()
    out = torch.empty(m, n)
    cpu_ops().int8_linear(out, x, q, scales, bias)
    err = (out.double() - ref).abs()
    slack = 1e-5 * (x.double().abs() @ w.double().abs().T + bias.double().abs())
    assert (err <= bound + slack).all(), label
    alone = torch.empty(1, n)
    cpu_ops().int8_linear(alone, x[-1:].clone(), q, scales, bias)
    assert torch.equal(alone[0], out[-1]), label
    exact = torch.empty(m, n)
    cpu_ops().int8_linear(exact, x, q, scales, bias, False)
    torch.testing.assert_close(exact.double(), ref, rtol=1e-6, atol=1e-5)
    return out


@pytest.mark.parametrize("n,k,group", [(45, 100, 32), (70, 576, 64), (33, 192, 192)])
def test_int8_panels_equal_dequantize_then_matmul(n: int, k: int, group: int) -> None:
    gen = torch.Generator().manual_seed(n + k)
    weight = torch.randn(n, k, generator=gen)
    bias = torch.randn(n, generator=gen)
    q, scales = cpu_ops().pack_int8_panels(weight, group)
    assert q.shape == (n, (k + 63) // 64 * 64) and q.dtype == torch.uint8
    assert scales.shape == ((n + 31) // 32, q.shape[1] // group, 32)
    w = int8_round_trip(weight, group)
    for isa in isas():
        with kernel_isa(isa):
            for m in (1, 3, 8, 64, 300):
                x = torch.randn(m, k, generator=gen) * 3
                check_product(x, q, scales, w, bias, activation_bound(x, w, group), (isa, m))


def test_panels_hold_the_rows_bytes() -> None:
    """Panel p of 32 columns (the last narrower) holds each 4 inputs' bytes column by column;
    the scales are the rows' in [panels, groups, 32], zero past N."""
    weight = torch.randn(45, 128, generator=torch.Generator().manual_seed(3))
    rows, row_scales = cpu_ops().pack_int8_weight(weight, 32)
    q, scales = cpu_ops().pack_int8_panels(weight, 32)
    for p, width in ((0, 32), (1, 13)):
        panel = q.flatten()[p * 32 * 128:(p * 32 + width) * 128].reshape(32, width, 4)
        torch.testing.assert_close(panel.permute(1, 0, 2).reshape(width, 128),
                                   rows[32 * p:32 * p + width], rtol=0, atol=0)
        torch.testing.assert_close(scales[p, :, :width].T, row_scales[32 * p:32 * p + width],
                                   rtol=0, atol=0)
    assert torch.all(scales[1, :, 13:] == 0)


def test_isas_agree_bit_for_bit_in_any_batch() -> None:
    """bf16 in and out, a K with padding: every ISA, every row count, the same bits per row."""
    gen = torch.Generator().manual_seed(7)
    weight = torch.randn(100, 200, generator=gen)
    q, scales = cpu_ops().pack_int8_panels(weight, 64)
    x = torch.randn(17, 200, generator=gen).to(torch.bfloat16)
    empty = torch.empty(0)
    reference = None
    for isa in isas():
        with kernel_isa(isa):
            for rows in (1, 2, 3, 4, 5, 17):
                out = torch.empty(rows, 100, dtype=torch.bfloat16)
                cpu_ops().int8_linear(out, x[17 - rows:], q, scales, empty)
                if reference is None:
                    reference = out[-1].clone()
                assert torch.equal(out[-1], reference), (isa, rows)


def test_panels_take_8_bit_activations_only() -> None:
    q, scales = cpu_ops().pack_int8_panels(torch.randn(8, 64), 32)
    out = torch.empty(2, 8)
    with pytest.raises(RuntimeError, match="8-bit activations"):
        cpu_ops().int8_linear(out, torch.randn(2, 64), q, scales, torch.empty(0), True, 16)
    with pytest.raises(RuntimeError, match="group"):
        cpu_ops().pack_int8_panels(torch.randn(8, 64), 0)


def quantized_activations(x: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] per row in blocks of `group` (the row zero-padded to a multiple of 64): q =
    round_even(x * (1 / d)) clipped to +-127, d = max |block| / 127, in fp32 as the kernel does."""
    k = x.shape[1]
    blocks = F.pad(x.float(), (0, -k % 64)).reshape(x.shape[0], -1, group)
    d = blocks.abs().amax(2, keepdim=True) / 127
    inv = torch.where(d != 0, 1 / d, torch.zeros_like(d))
    q = torch.round(blocks * inv).clamp(-127, 127)
    return q.reshape(x.shape[0], -1)[:, :k], d.squeeze(2)


@pytest.mark.parametrize("k,group", [(100, 32), (576, 32), (1100, 32), (200, 16), (576, 64),
                                     (384, 192)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_activations_quantized_exactly(k: int, group: int, dtype: torch.dtype) -> None:
    """Through an identity weight (each row's one weight 127 steps of 1/127) output n is
    fma(127 * q[n], ws * d, 0): the activations' int8 values and scales bit for bit, for every
    block width, blocks past 16 per row and a ragged last block."""
    gen = torch.Generator().manual_seed(k + group)
    q_weight, scales = cpu_ops().pack_int8_panels(torch.eye(k), group)
    ws = torch.tensor(1 / 127, dtype=torch.float32)
    assert torch.all(scales[:, :, :][scales != 0] == ws)
    x = (torch.randn(7, k, generator=gen) * 3).to(dtype)
    x[2, : min(k, group + 5)] = 0  # a block of zeros (d = 0) and one partly
    q, d = quantized_activations(x, group)
    blocks_of = torch.arange(k) // group
    expected = (127 * q) * (ws * d[:, blocks_of])
    for rows in (1, 7):
        out = torch.empty(rows, k)
        cpu_ops().int8_linear(out, x[:rows], q_weight, scales, torch.empty(0))
        assert torch.equal(out, expected[:rows]), rows


def panels_16(weight: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The W8A8 GEMM's panels with scales for 16-bit activations (layers/quantization/int8.py:
    panels_for_16_bits)."""
    from pagedllm.layers.quantization.int8 import panels_for_16_bits

    q, scales = cpu_ops().pack_int8_panels(weight, group)
    return q, panels_for_16_bits(scales)


@pytest.mark.parametrize("n,k,group", [(45, 100, 32), (70, 576, 64)])
def test_int8_panels_with_16_bit_activations(n: int, k: int, group: int) -> None:
    """4-D scales ([panels, groups, 2, 32]: 255 * ws, ws) take the activations in 16 bits (q =
    255 * high + low): within the bound of a 16-bit step (max |block| / (127 * 255)) around
    x @ dequantize(W).T, every ISA the same bits, a row alone as in any batch; with the hook,
    the exact product."""
    gen = torch.Generator().manual_seed(n * k)
    weight = torch.randn(n, k, generator=gen)
    bias = torch.randn(n, generator=gen)
    q, scales = panels_16(weight, group)
    assert scales.shape == ((n + 31) // 32, q.shape[1] // group, 2, 32)
    w = int8_round_trip(weight, group)
    reference = {}
    for isa in isas():
        with kernel_isa(isa):
            for m in (1, 3, 8, 64):
                x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)) * 3
                bound = activation_bound(x, w, group) / 255  # a 16-bit step
                out = check_product(x, q, scales, w, bias, bound, (isa, m))
                reference.setdefault(m, out)
                assert torch.equal(out, reference[m]), (isa, m)


def test_16_bit_panels_take_16_bit_activations_only() -> None:
    q, scales = panels_16(torch.randn(8, 64), 32)
    out = torch.empty(2, 8)
    with pytest.raises(RuntimeError, match="16-bit activations"):
        cpu_ops().int8_linear(out, torch.randn(2, 64), q, scales, torch.empty(0), True, 8)
    cpu_ops().int8_linear(out, torch.randn(2, 64), q, scales, torch.empty(0), True, 16)


@pytest.mark.parametrize("n,k,group", [(45, 100, 32), (70, 576, 32)])
def test_int8_panels_with_16_bit_weights(n: int, k: int, group: int) -> None:
    """Bytes of two planes per group (q1, then the residual's q2) with 4-D scales are weights
    q1 * s1 + q2 * s2 times 8-bit activations: within the 8-bit activations' bound around x @
    that weight, far nearer the float weight than one plane, every ISA the same bits, a row
    alone as in any batch; with the hook, the exact product."""
    from pagedllm.layers.quantization.int8 import panels_of_16_bit_weights

    gen = torch.Generator().manual_seed(n + 2 * k)
    weight = torch.randn(n, k, generator=gen)
    bias = torch.randn(n, generator=gen)
    q, scales = panels_of_16_bit_weights(weight, group)
    kp = (k + 63) // 64 * 64
    assert q.shape == (n, 2 * kp) and scales.shape == ((n + 31) // 32, kp // group, 2, 32)
    w1 = int8_round_trip(weight, group)
    w = w1 + int8_round_trip(weight - w1, group)
    assert (w - weight).abs().max() < (w1 - weight).abs().max() / 50
    reference = {}
    for isa in isas():
        with kernel_isa(isa):
            for m in (1, 3, 8, 64):
                x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)) * 3
                out = check_product(x, q, scales, w, bias, activation_bound(x, w, group),
                                    (isa, m))
                reference.setdefault(m, out)
                assert torch.equal(out, reference[m]), (isa, m)
