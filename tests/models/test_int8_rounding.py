"""int8 rounding in torch (layers/quantization/int8_rounding.py) against the kernels' own
packing: round to nearest gives pack_int8_weight's bytes and scales, and the torch packing of
those values gives pack_int8_panels' panels, bit for bit."""

from __future__ import annotations

import pytest
import torch

from pagedllm.layers.quantization.int8_rounding import int8_panels, int8_rows, round_to_int8
from pagedllm.ops import cpu_ops

pytestmark = pytest.mark.skipif(cpu_ops() is None, reason="compares with the ops' packing")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("n", "k", "group"), [(70, 100, 32), (64, 576, 32), (33, 128, 64),
                                               (5, 64, 16), (40, 1536, 32)])
def test_round_to_nearest_and_panels_equal_the_ops(n, k, group, dtype) -> None:
    torch.manual_seed(n * k + group)
    weight = (torch.randn(n, k) * torch.rand(1, k) * 3).to(dtype)
    weight[0, : min(k, group)] = 0  # an all-zero group: scale 0
    q, scales = round_to_int8(weight, group)
    ops = cpu_ops()
    rows, row_scales = ops.pack_int8_weight(weight, group)
    got_rows, got_row_scales = int8_rows(q, scales)
    assert torch.equal(got_rows, rows) and torch.equal(got_row_scales, row_scales)
    panels, panel_scales = ops.pack_int8_panels(weight, group)
    got_panels, got_panel_scales = int8_panels(q, scales)
    assert torch.equal(got_panels, panels) and torch.equal(got_panel_scales, panel_scales)


def test_gptq_rounding_lowers_the_output_error() -> None:
    """Error-compensated rounding (a calibration Hessian) against round to nearest, on inputs
    with correlated channels of unequal size: a lower squared output error."""
    torch.manual_seed(0)
    mix = torch.randn(64, 64) * 0.3 + torch.eye(64)
    x = torch.randn(512, 64) @ mix * torch.linspace(0.1, 4, 64)
    weight = torch.randn(48, 64)
    errors = []
    for hessian in (None, x.T.double() @ x.double()):
        q, scales = round_to_int8(weight, 32, hessian)
        dequantized = (q.float().view(48, -1, 32) * scales[:, :, None]).view(48, 64)
        errors.append(((x @ (weight - dequantized).T) ** 2).mean().item())
    assert errors[1] < 0.9 * errors[0], errors
