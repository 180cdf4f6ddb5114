"""Gated MLP activations over a fused [gate | up] projection: SwiGLU's silu(gate) * up and
GeGLU's gelu_tanh(gate) * up (Gemma)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pagedllm.ops import native_ops


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    # gate_up: [num_tokens, 2 * intermediate] -> [num_tokens, intermediate]
    ops = native_ops(gate_up) if gate_up.dim() == 2 else None
    if ops is not None:
        out = gate_up.new_empty(gate_up.shape[0], gate_up.shape[1] // 2)
        ops.silu_and_mul(out, gate_up)
        return out
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def gelu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """gelu(gate) * up with GELU's tanh approximation (transformers' gelu_pytorch_tanh), in the
    input's dtype: [num_tokens, 2 * intermediate] -> [num_tokens, intermediate]."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.gelu(gate, approximate="tanh") * up
