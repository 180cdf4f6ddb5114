"""int8 rounding in torch and the kernels' weight layouts, for quantization="int8": round to
nearest with pack_int8_weight's scales (its very bytes), GPTQ's error-compensated rounding with
a layer's Hessian (round_to_int8), and the q/scales of either laid out as pack_int8_weight's
rows (int8_rows) or pack_int8_panels' W8A8 panels (int8_panels; int8.py's 16-bit weights are
packed with it at load). GPTQ is not used at load: a layer of SmolLM2's took ~20 s in torch on
the loaded 2 cores.
"""

from __future__ import annotations

import torch

PANEL_COLS = 32  # ops/csrc/int8_gemm.h: kInt8PanelCols


def padded_inputs(k: int) -> int:
    return -(-k // 64) * 64


def group_scales(w: torch.Tensor) -> torch.Tensor:
    """w [N, G] fp32 -> [N, 1]: pack_int8_weight's scale, in its float arithmetic: among
    max |w| * (1 - 0.02 c) / 127, c = 0..15, the one with the least squared error."""
    amax = w.abs().amax(1, keepdim=True)
    best, best_err = None, None
    for c in range(16):
        factor = torch.tensor(1.0, dtype=torch.float32) - torch.tensor(0.02, dtype=torch.float32) * c
        scale = amax * factor / 127.0
        inv = torch.where(scale != 0, 1.0 / scale, torch.zeros_like(scale))
        q = torch.round(w * inv).clamp(-127, 127)
        err = (w.double() - q.double() * scale.double()).pow(2).sum(1, keepdim=True)
        if best is None:
            best, best_err = scale, err
        else:
            better = err < best_err
            best, best_err = torch.where(better, scale, best), torch.where(better, err, best_err)
    return best


def round_to_int8(weight: torch.Tensor, group_size: int,
                  hessian: torch.Tensor | None = None, damp: float = 0.01,
                  block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [N, K] -> (q int8 [N, K], scales fp32 [N, groups over K padded to 64]).

    Without `hessian`: round to nearest with pack_int8_weight's scales (its very bytes).
    With hessian = X^T X of the layer's calibration inputs [K, K]: GPTQ's error-compensated
    rounding, column by column, each group's scale chosen (as above) when its first column is
    reached from the weights as updated so far; each column's rounding error is spread over
    the later columns through the Cholesky factor of the damped inverse Hessian."""
    w = weight.detach().float()
    n, k = w.shape
    kp = padded_inputs(k)
    if group_size <= 0 or group_size % 16 or kp % group_size:
        raise ValueError(f"group_size must be a multiple of 16 dividing {kp}, got {group_size}")
    scales = torch.zeros(n, kp // group_size)
    q = torch.zeros(n, k, dtype=torch.int8)
    if hessian is None:
        for g0 in range(0, k, group_size):
            g1 = min(k, g0 + group_size)
            s = group_scales(w[:, g0:g1])
            inv = torch.where(s != 0, 1.0 / s, torch.zeros_like(s))
            q[:, g0:g1] = torch.round(w[:, g0:g1] * inv).clamp(-127, 127).to(torch.int8)
            scales[:, g0 // group_size] = s[:, 0]
        return q, scales
    if block % group_size:
        block = group_size * max(1, block // group_size)
    h = hessian.double().clone()
    w = w.double()
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h.diagonal().add_(damp * torch.diagonal(h).mean())
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    for b0 in range(0, k, block):
        b1 = min(k, b0 + block)
        w1 = w[:, b0:b1].clone()
        err = torch.zeros_like(w1)
        h1 = hinv[b0:b1, b0:b1]
        s = inv = None
        for j in range(b1 - b0):
            col = b0 + j
            if col % group_size == 0:
                s = group_scales(w1[:, j:j + group_size].float()).double()
                inv = torch.where(s != 0, 1.0 / s.float(), torch.zeros_like(s.float())).double()
                scales[:, col // group_size] = s[:, 0].float()
            qj = torch.round((w1[:, j:j + 1].float() * inv.float()).double()).clamp(-127, 127)
            q[:, col] = qj[:, 0].to(torch.int8)
            e = (w1[:, j:j + 1] - qj * s) / h1[j, j]
            w1[:, j:] -= e * h1[j:j + 1, j:]
            err[:, j:j + 1] = e
        w[:, b1:] -= err @ hinv[b0:b1, b1:]
    return q, scales


def int8_rows(q: torch.Tensor, scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q int8 [N, K], scales [N, groups]) -> pack_int8_weight's layout: bytes [N, Kp] uint8
    = q + 128 (128 past K), scales fp32 [N, groups]."""
    n, k = q.shape
    data = torch.full((n, padded_inputs(k)), 128, dtype=torch.uint8)
    data[:, :k] = (q.to(torch.int16) + 128).to(torch.uint8)
    return data, scales.float().contiguous()


def int8_panels(q: torch.Tensor, scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q int8 [N, K], scales [N, groups]) -> pack_int8_panels' layout (ops/csrc/int8_gemm.h):
    panel p (columns 32p .. 32p + w - 1) is w * Kp bytes at 32p * Kp, for each 4 inputs the w
    columns' 4 bytes; scales [panels, groups, 32], zero past N."""
    rows, row_scales = int8_rows(q, scales)
    n, kp = rows.shape
    panels = torch.empty_like(rows)
    flat = panels.view(-1)
    for n0 in range(0, n, PANEL_COLS):
        width = min(PANEL_COLS, n - n0)
        flat[n0 * kp:(n0 + width) * kp] = (
            rows[n0:n0 + width].view(width, kp // 4, 4).transpose(0, 1).reshape(-1))
    num_panels = -(-n // PANEL_COLS)
    padded = torch.zeros(num_panels * PANEL_COLS, row_scales.shape[1])
    padded[:n] = row_scales
    return panels, padded.view(num_panels, PANEL_COLS, -1).transpose(1, 2).contiguous()
