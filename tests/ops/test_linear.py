"""Packed linear layers (streaming kernel, panel GEMM, oneDNN) against F.linear.

The engine packs its layers batch-invariant (panels or the bf16 dot-product kernel for every
batch); the row-count paths of `batch_invariant=False` (streaming kernel, oneDNN) are checked
here too, through PackedWeight's methods and test_each_row_count_takes_its_path.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pagedllm.layers import linear as linear_module
from pagedllm.layers.linear import (
    AMX_PANELS,
    DOT_PANELS,
    FEW_ROWS,
    PANELS,
    FP32_PANEL_MAX_ROWS,
    Linear,
    amx_kernel_applies,
    dot_kernel_applies,
    pack_linear_layers,
)
from pagedllm.layers.activation import silu_and_mul
from pagedllm.ops import cpu_ops

# Each path and both sides of each switch point.
# 1-8 and 9: the panel kernels' few-rows passes (6 rows each) and the GEMM.
ROWS = sorted({1, 3, 4, 5, FEW_ROWS, FEW_ROWS + 1, 13, 16, 17, 64,
               FP32_PANEL_MAX_ROWS, FP32_PANEL_MAX_ROWS + 1})


def _reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    # A bf16 GEMM: bf16 operands, fp32 accumulation, one rounding of the result.
    out = F.linear(x.float(), weight.float(), None if bias is None else bias.float())
    return out.to(x.dtype)


def assert_fp32_sums_close(got: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                           bias: torch.Tensor | None = None) -> None:
    """fp32 sums of x @ weight.T (+ bias) against the exact (fp64) ones.

    NOTE: the bound scales with sum |x_i w_i| + |b| and with k, as the rounding error of a
    length-k fp32 dot product does, instead of a fixed atol: with a fixed atol and an fp32
    oracle the outcome hung on where cancellations fell and on the oracle's own summation
    order, which differs by CPU (it failed on a 16-core AMX host, 1.4e-4 against 1e-4).
    Indexing bugs give errors of the order of the sum itself, far above the bound.
    """
    x64, w64 = x.double(), weight.double()
    b64 = None if bias is None or bias.numel() == 0 else bias.double()
    exact = F.linear(x64, w64, b64)
    magnitude = F.linear(x64.abs(), w64.abs(), None if b64 is None else b64.abs())
    # Up to 16 terms the worst case, (k + 1) * u * magnitude, which holds for any order; past
    # 64, twice the probabilistic bound u * sqrt(k + 1) * magnitude (the panel kernel reached
    # 1.4x the single bound at k = 2 and 0.35x at k = 257 over 300 seeds).
    terms = x.shape[-1] + 1
    bound = min(terms, max(16, 2 * terms**0.5)) * 2.0**-24 * magnitude
    error = (got.double() - exact).abs()
    assert got.shape == exact.shape and bool((error <= bound).all()), (
        f"error up to {(error / bound.clamp_min(1e-300)).max().item():.2f}x the fp32 bound")


@pytest.mark.parametrize("batch_invariant", [True, False], ids=["invariant", "fastest"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("bias", [False, True])
def test_packed_linear_matches_f_linear(dtype: torch.dtype, rows: int, bias: bool,
                                        batch_invariant: bool) -> None:
    torch.manual_seed(rows)
    # in=100 leaves a tail after the 8-lane steps; out=37 leaves one after the row tiles.
    layer = Linear(100, 37, bias=bias).to(dtype)
    weight = layer.weight.detach().clone()
    bias_t = None if layer.bias is None else layer.bias.detach().clone()
    assert layer.pack(batch_invariant=batch_invariant)
    assert layer.weight.numel() == 0  # the packed copy replaced the plain parameter
    x = torch.randn(rows, 100).to(dtype)
    got = layer(x)
    assert got.dtype == dtype and got.shape == (rows, 37)
    tol = {"rtol": 1e-5, "atol": 1e-4} if dtype == torch.float32 else {"rtol": 1e-2, "atol": 1e-2}
    torch.testing.assert_close(got, _reference(x, weight, bias_t), **tol)
    # fp32 out (the LM head's logits): the panel kernel writes the fp32 sums, unrounded; the
    # other paths round to x's dtype first.
    got_fp32 = layer.packed(x, out_dtype=torch.float32)
    assert got_fp32.dtype == torch.float32 and got_fp32.shape == (rows, 37)
    full = F.linear(x.float(), weight.float(), None if bias_t is None else bias_t.float())
    packed = layer.packed
    unrounded = dtype == torch.float32 or packed.path(rows) in (PANELS, DOT_PANELS, AMX_PANELS)
    torch.testing.assert_close(got_fp32, full, **(tol if not unrounded else
                                                  {"rtol": 1e-5, "atol": 1e-4}))


def test_bf16_layer_takes_other_input_dtypes() -> None:
    # fp16 rows (no kernel takes them) are converted, and the result has their dtype.
    torch.manual_seed(0)
    layer = Linear(64, 40, bias=True).to(torch.bfloat16)
    weight, bias = layer.weight.detach().float().clone(), layer.bias.detach().float().clone()
    layer.pack()
    x = torch.randn(2, 3, 64).half()
    got = layer(x)
    assert got.dtype == torch.float16 and got.shape == (2, 3, 40)
    torch.testing.assert_close(got.float(), F.linear(x.float(), weight, bias), rtol=2e-2,
                               atol=2e-2)


@pytest.mark.parametrize("batch_invariant", [True, False], ids=["invariant", "fastest"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_each_row_count_takes_its_path(monkeypatch: pytest.MonkeyPatch, dtype,
                                       batch_invariant: bool) -> None:
    if cpu_ops() is None:
        pytest.skip("CPU ops unavailable")
    layer = Linear(64, 16, bias=False).to(dtype)
    layer.pack(batch_invariant=batch_invariant)
    packed = layer.packed
    calls = []
    for name in ("few_rows", "panel", "onednn", "dot", "amx"):
        real = getattr(packed, name)
        monkeypatch.setattr(
            packed, name, lambda x, *rest, n=name, f=real: calls.append(n) or f(x, *rest)
        )
    expected = []
    for rows in (1, packed.stream_max_rows + 1, min(packed.panel_max_rows, 1000) + 1):
        layer(torch.randn(rows, 64).to(dtype))
        expected.append("amx" if packed.amx_panels is not None
                        else "dot" if packed.dot_panels is not None
                        else "few_rows" if rows <= packed.stream_max_rows
                        else "panel" if rows <= packed.panel_max_rows else "onednn")
    assert calls == expected
    if dtype == torch.bfloat16 and amx_kernel_applies(batch_invariant):  # one copy, every batch
        assert packed.amx_panels is not None and packed.amx_panels.dtype == torch.bfloat16
        assert packed.plain is None and packed.panels is None and packed.onednn_weight is None
        return
    if dtype == torch.bfloat16 and dot_kernel_applies(batch_invariant):  # one copy, every batch
        assert packed.dot_panels is not None and packed.dot_panels.dtype == torch.bfloat16
        assert packed.plain is None and packed.panels is None and packed.onednn_weight is None
        return
    if batch_invariant:  # panels (in the weight's dtype) for every batch, and nothing else
        assert packed.panel_max_rows == float("inf") and packed.onednn_weight is None
        assert packed.panels.dtype == dtype
        assert packed.plain is None and packed.stream_max_rows == 0
    elif dtype == torch.float32:  # panels for decode batches, oneDNN for prefill
        assert (packed.stream_max_rows, packed.panel_max_rows) == (0, FP32_PANEL_MAX_ROWS)
    elif not linear_module.onednn_has_gemm(torch.bfloat16):  # bf16 never widened to fp32
        assert packed.panel_max_rows == float("inf") and packed.onednn_weight is None
        assert packed.panels.dtype == torch.bfloat16
        assert packed.plain is None and packed.stream_max_rows == 0  # held once, as panels


def _check_panel_out(out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                     bias: torch.Tensor | None) -> None:
    if out.dtype == torch.float32:
        assert_fp32_sums_close(out, x, weight, bias)
    else:  # one rounding of the fp32 sums to bf16
        ref = F.linear(x.float(), weight.float(), bias).to(out.dtype)
        torch.testing.assert_close(out, ref, rtol=1e-2, atol=1e-2)


def test_panel_kernel_shapes_and_strides() -> None:
    ops = cpu_ops()
    if ops is None:
        pytest.skip("CPU ops unavailable")
    torch.manual_seed(0)
    # Edges; k = 4100: x of the few-rows pass outgrows its stack buffer; n = 200: more panels
    # than threads, so that threads take from each other's shares.
    for n, k in [(1, 1), (15, 7), (16, 256), (17, 257), (40, 600), (24, 2000), (9, 4100),
                 (200, 300)]:
        for dtype in (torch.float32, torch.bfloat16):
            weight = torch.randn(n, k).to(dtype)
            bias = torch.randn(n)
            panels = ops.pack_panels(weight)
            for rows in (0, 1, 5, 6, 7, 13, 100):  # 100: several row blocks at k = 2000
                wide = torch.randn(rows, k + 3).to(dtype)
                x = wide[:, 1:k + 1]  # rows strided, as a slice of a wider tensor
                out = torch.empty(rows, n, dtype=dtype)
                ops.panel_linear(out, x, panels, bias)
                _check_panel_out(out, x, weight, bias)
            column_major = torch.randn(k, 5).to(dtype).t()  # no contiguous dimension of rows
            out = torch.empty(5, n, dtype=dtype)
            ops.panel_linear(out, column_major, panels, torch.empty(0))
            _check_panel_out(out, column_major, weight, None)
    with pytest.raises(RuntimeError, match="columns"):
        ops.panel_linear(torch.empty(2, 16), torch.randn(2, 8), ops.pack_panels(torch.randn(16, 9)),
                         torch.empty(0))


def test_dot_kernel_shapes_and_strides() -> None:
    ops = cpu_ops()
    if ops is None or not ops.has_bf16_dot():
        pytest.skip("no AVX512_BF16 kernel on this CPU")
    torch.manual_seed(0)
    # Edges: odd k (a zero-padded last pair), n past a 48-column panel, k = 2000 with 100 rows:
    # two row blocks.
    for n, k in [(1, 1), (15, 7), (48, 256), (49, 257), (100, 600), (24, 2000)]:
        weight = torch.randn(n, k).bfloat16()
        bias = torch.randn(n)
        packed = ops.pack_dot_panels(weight)
        assert packed.shape == (-(-n // 48), -(-k // 2), 96)
        for rows in (0, 1, 5, 7, 8, 9, 13, 100):
            # Rows strided, as a slice of a wider tensor: read in place where the pairs stay
            # aligned (even k and stride), else through a padded copy.
            wide = torch.randn(rows, k + 4 if k % 2 == 0 else k + 3).bfloat16()
            x = wide[:, 2:k + 2] if k % 2 == 0 else wide[:, 1:k + 1]
            for out_dtype in (torch.bfloat16, torch.float32):
                out = torch.empty(rows, n, dtype=out_dtype)
                ops.dot_panel_linear(out, x, packed, bias)
                # fp32 sums of exact bf16 products: only the summation order differs.
                if out_dtype == torch.float32:
                    assert_fp32_sums_close(out, x, weight, bias)
                else:
                    full = F.linear(x.float(), weight.float(), bias)
                    torch.testing.assert_close(out.float(), full.to(out_dtype).float(),
                                               rtol=1e-2, atol=1e-2)
            x32 = torch.randn(rows, k)  # fp32 x is rounded to bf16 first
            out = torch.empty(rows, n)
            ops.dot_panel_linear(out, x32, packed, torch.empty(0))
            assert_fp32_sums_close(out, x32.bfloat16(), weight)
            # Gated ([gate | up], SwiGLU's down projection): the silu_and_mul op's output, in
            # x's dtype, rounded to bf16 once.
            for gate_dtype in (torch.bfloat16, torch.float32):
                gate_up = (torch.randn(rows, 2 * k) * 3).to(gate_dtype)
                out = torch.empty(rows, n)
                ops.dot_panel_linear(out, gate_up, packed, bias, True)
                gated = silu_and_mul(gate_up).bfloat16()
                # Same bf16 operands (gate_up is scaled by 3 to reach the silu's tails); only
                # the fp32 summation order differs.
                assert_fp32_sums_close(out, gated, weight, bias)
    empty_k = torch.empty(3, 5)  # K = 0: the bias alone
    ops.dot_panel_linear(empty_k, torch.empty(3, 0).bfloat16(),
                         ops.pack_dot_panels(torch.empty(5, 0).bfloat16()), torch.arange(5.0))
    assert torch.equal(empty_k, torch.arange(5.0).expand(3, 5))
    with pytest.raises(RuntimeError, match="columns"):
        ops.dot_panel_linear(torch.empty(2, 16), torch.randn(2, 8).bfloat16(),
                             ops.pack_dot_panels(torch.randn(16, 10).bfloat16()), torch.empty(0))
    with pytest.raises(RuntimeError, match="pack_dot_panels"):
        ops.dot_panel_linear(torch.empty(2, 16), torch.randn(2, 8).bfloat16(),
                             ops.pack_panels(torch.randn(16, 8).bfloat16()), torch.empty(0))


def test_amx_kernel_shapes_and_strides() -> None:
    ops = cpu_ops()
    if ops is None or not ops.has_amx():
        pytest.skip("no AMX kernel on this CPU")
    torch.manual_seed(0)
    # Edges: k past and short of a 32-input chunk (zero-padded), n past a 32-column panel;
    # rows around the 16-row tiles and their pairs; k = 2000 with 300 rows: several row blocks.
    for n, k in [(1, 1), (15, 7), (32, 64), (33, 65), (100, 600), (24, 2000)]:
        weight = torch.randn(n, k).bfloat16()
        bias = torch.randn(n)
        packed = ops.pack_amx_panels(weight)
        assert packed.shape == (-(-n // 32), -(-k // 32), 2, 16, 32)
        for rows in (0, 1, 15, 16, 17, 32, 33, 100, 300):
            # Rows strided, as a slice of a wider tensor (read in place only when whole tiles).
            x = torch.randn(rows, k + 64).bfloat16()[:, 3:k + 3]
            for out_dtype in (torch.bfloat16, torch.float32):
                out = torch.empty(rows, n, dtype=out_dtype)
                ops.amx_panel_linear(out, x, packed, bias)
                if out_dtype == torch.float32:  # sums of exact bf16 products
                    assert_fp32_sums_close(out, x, weight, bias)
                else:
                    full = F.linear(x.float(), weight.float(), bias)
                    torch.testing.assert_close(out.float(), full.to(out_dtype).float(),
                                               rtol=1e-2, atol=1e-2)
            aligned = torch.randn(rows, k).bfloat16()  # read in place (k % 32 == 0, whole tiles)
            out = torch.empty(rows, n)
            ops.amx_panel_linear(out, aligned, packed, torch.empty(0))
            assert_fp32_sums_close(out, aligned, weight)
            x32 = torch.randn(rows, k)  # fp32 x is rounded to bf16 first
            out = torch.empty(rows, n)
            ops.amx_panel_linear(out, x32, packed, torch.empty(0))
            assert_fp32_sums_close(out, x32.bfloat16(), weight)
            gate_up = (torch.randn(rows, 2 * k) * 3).bfloat16()  # [gate | up]: the op's output
            out = torch.empty(rows, n)
            ops.amx_panel_linear(out, gate_up, packed, bias, True)
            assert_fp32_sums_close(out, silu_and_mul(gate_up), weight, bias)
    empty_k = torch.empty(3, 5)  # K = 0: the bias alone
    ops.amx_panel_linear(empty_k, torch.empty(3, 0).bfloat16(),
                         ops.pack_amx_panels(torch.empty(5, 0).bfloat16()), torch.arange(5.0))
    assert torch.equal(empty_k, torch.arange(5.0).expand(3, 5))
    with pytest.raises(RuntimeError, match="columns"):
        ops.amx_panel_linear(torch.empty(2, 16), torch.randn(2, 8).bfloat16(),
                             ops.pack_amx_panels(torch.randn(16, 40).bfloat16()), torch.empty(0))
    with pytest.raises(RuntimeError, match="pack_amx_panels"):
        ops.amx_panel_linear(torch.empty(2, 16), torch.randn(2, 8).bfloat16(),
                             ops.pack_panels(torch.randn(16, 8).bfloat16()), torch.empty(0))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 5, FEW_ROWS, FEW_ROWS + 1, 64, 300])
def test_down_projection_fused_with_silu_and_mul_gives_the_same_bits(dtype, rows) -> None:
    torch.manual_seed(rows)
    # in = 1030: a tail after the 8-lane steps; 300 rows at this width: several row blocks.
    layer = Linear(1030, 40, bias=True).to(dtype)
    weight, bias = layer.weight.detach().clone(), layer.bias.detach().clone()
    assert layer.pack()
    gate_up = (torch.randn(rows, 2 * 1030) * 3).to(dtype)
    got = layer.after_silu_and_mul(gate_up)
    assert got.dtype == dtype and got.shape == (rows, 40)
    # Bit for bit what the separate op followed by the layer gives...
    torch.testing.assert_close(got, layer(silu_and_mul(gate_up)), rtol=0, atol=0)
    # ...which is SwiGLU's down projection.
    gate, up = gate_up.float().chunk(2, dim=-1)
    reference = F.linear(F.silu(gate) * up, weight.float(), bias.float()).to(dtype)
    tol = {"rtol": 1e-4, "atol": 1e-3} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 5e-2}
    torch.testing.assert_close(got, reference, **tol)


def test_swiglu_kernel_gives_the_bits_of_the_projection_then_the_gate() -> None:
    ops = cpu_ops()
    if ops is None or not ops.has_bf16_dot():
        pytest.skip("no AVX512_BF16 kernel on this CPU")
    torch.manual_seed(0)
    # Units: 1536 (SmolLM2), 100 (a panel of 24 cut short; the gate op's scalar tail past 96),
    # 8 and 37 (fewer than a vector; a tail); k odd, and 0 (the bias alone).
    for units, k in [(1536, 576), (100, 33), (37, 64), (8, 2), (24, 0)]:
        weight = (torch.randn(2 * units, k) * 0.3).bfloat16()
        swiglu_packed = ops.pack_dot_swiglu_panels(weight)
        assert swiglu_packed.shape == (-(-units // 24), -(-k // 2), 96)
        for rows in (1, 5, 64):
            for bias in (torch.empty(0), torch.randn(2 * units)):
                for dtype in (torch.bfloat16, torch.float32):
                    x = torch.randn(rows, k).to(dtype)
                    gate_up = torch.empty(rows, 2 * units, dtype=dtype)
                    ops.dot_panel_linear(gate_up, x, ops.pack_dot_panels(weight), bias)
                    expected = torch.empty(rows, units, dtype=dtype)
                    ops.silu_and_mul(expected, gate_up)
                    got = torch.empty(rows, units, dtype=dtype)
                    ops.dot_swiglu_linear(got, x, swiglu_packed, bias)
                    assert torch.equal(got, expected), (units, k, rows, bias.numel(), dtype)
    with pytest.raises(RuntimeError, match="units"):
        ops.dot_swiglu_linear(torch.empty(2, 30), torch.randn(2, 8).bfloat16(),
                              ops.pack_dot_swiglu_panels(torch.randn(20, 8).bfloat16()),
                              torch.empty(0))
    with pytest.raises(RuntimeError, match="even number of rows"):
        ops.pack_dot_swiglu_panels(torch.randn(5, 8).bfloat16())


@pytest.mark.parametrize("rows", [1, 7, 64])
def test_gate_up_layer_gates_in_its_gemm(rows: int) -> None:
    torch.manual_seed(rows)
    layer = Linear(96, 2 * 80, bias=True).bfloat16()
    reference = Linear(96, 2 * 80, bias=True).bfloat16()
    reference.load_state_dict(layer.state_dict())
    layer.gates_swiglu = True
    assert layer.pack() and reference.pack()
    assert layer.fuses_swiglu == dot_kernel_applies()
    x = torch.randn(rows, 96).bfloat16()
    got = layer.swiglu(x)
    assert got.shape == (rows, 80) and got.dtype == torch.bfloat16
    torch.testing.assert_close(got, silu_and_mul(reference(x)), rtol=0, atol=0)
    # Any leading shape, and other input dtypes (converted, as the plain projection does).
    torch.testing.assert_close(layer.swiglu(x.view(1, rows, 96)), got.view(1, rows, 80),
                               rtol=0, atol=0)
    assert layer.swiglu(x.half()).dtype == torch.float16
    assert layer.swiglu(x[:0]).shape == (0, 80)
    if layer.fuses_swiglu:  # its panels interleave gate and up units: no plain projection
        for plain_call in (layer, layer.packed.dot, layer.after_silu_and_mul):
            with pytest.raises(RuntimeError, match="swiglu"):
                plain_call(x)


def test_fused_gate_needs_a_gate_up_input() -> None:
    ops = cpu_ops()
    if ops is None:
        pytest.skip("CPU ops unavailable")
    panels = ops.pack_panels(torch.randn(16, 8))
    with pytest.raises(RuntimeError, match="gate \\| up"):
        ops.panel_linear(torch.empty(20, 16), torch.randn(20, 15), panels, torch.empty(0), True)
    with pytest.raises(RuntimeError, match="columns"):
        ops.panel_linear(torch.empty(20, 16), torch.randn(20, 8), panels, torch.empty(0), True)


def test_pack_linear_layers_skips_what_onednn_cannot_take(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    model = torch.nn.Sequential(Linear(8, 8), Linear(8, 4), torch.nn.Linear(4, 2))
    assert pack_linear_layers(model) == 2  # plain nn.Linear is not ours to pack
    monkeypatch.setattr(linear_module.torch.backends.mkldnn, "is_available", lambda: False)
    other = Linear(8, 8)
    assert not other.pack() and other.packed is None and other.weight.numel() == 64
