"""Chooses between a fused C++ op and its torch code, per call (layers and sampler)."""

from __future__ import annotations

from typing import Any

import torch

from pagedllm.ops.cpu_extension import cpu_ops

# The dtypes every C++ op takes.
NATIVE_DTYPES = (torch.float32, torch.bfloat16)


def native_ops(*tensors: torch.Tensor) -> Any:
    """`torch.ops.pagedllm_cpu` when every tensor suits the fused CPU ops, else None.

    They take 2-D or 3-D CPU tensors in fp32/bf16 whose last dimension is contiguous; anything
    else (a GPU tensor, fp16, a failed build) takes the torch path.
    """
    for t in tensors:
        if t.device.type != "cpu" or t.dtype not in NATIVE_DTYPES or t.stride(-1) != 1:
            return None
    return cpu_ops()
