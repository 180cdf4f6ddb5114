"""The dense linear method: an unquantized weight packed once for the CPU kernels.

After loading, the weight (and the bias this rank adds) becomes a `PackedWeight`
(layers/packed.py), which picks the kernel per call: batch-invariant by default, SwiGLU's
gating fused into the gate_up GEMM or the down projection's packing where the kernels allow.
Where the weight cannot be packed (another device, dtype or platform) the layer keeps its
plain parameter and F.linear. The arithmetic is exactly that of pagedllm's `Linear` before
the seam existed.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pagedllm.layers.activation import silu_and_mul
from pagedllm.layers.packed import try_pack
from pagedllm.layers.quantization.base import Allocate, LinearMethodBase, set_weight_attrs


class UnquantizedLinearMethod(LinearMethodBase):
    """One [out, in] weight in the model's dtype; `layer.packed` once processed."""

    def create_weights(self, layer: nn.Module, input_size_per_partition: int,
                       output_partition_sizes: list[int], input_size: int, output_size: int,
                       params_dtype: torch.dtype, **extra_weight_attrs: Any) -> None:
        weight = nn.Parameter(torch.empty(sum(output_partition_sizes), input_size_per_partition,
                                          dtype=params_dtype), requires_grad=False)
        set_weight_attrs(weight, {"input_dim": 1, "output_dim": 0})
        set_weight_attrs(weight, extra_weight_attrs)
        layer.register_parameter("weight", weight)

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        packed = try_pack(layer.weight, layer.rank_bias(), layer.batch_hint, layer.gates_swiglu,
                          layer.batch_invariant)
        if packed is None:
            return
        layer.packed = packed
        # The packed copy replaces the plain weight.
        layer.weight = nn.Parameter(layer.weight.new_empty(0), requires_grad=False)

    def apply(self, layer: nn.Module, x: torch.Tensor,
              bias: torch.Tensor | None = None) -> torch.Tensor:
        if layer.packed is not None:  # the bias is packed with the weight
            return layer.packed(x)
        return F.linear(x, layer.weight, bias)

    def fuses_swiglu(self, layer: nn.Module) -> bool:
        return layer.packed is not None and layer.packed.fuses_swiglu

    def apply_swiglu(self, layer: nn.Module, x: torch.Tensor,
                     bias: torch.Tensor | None = None) -> torch.Tensor:
        if layer.packed is not None:
            return layer.packed.swiglu(x)
        return silu_and_mul(F.linear(x, layer.weight, bias))

    def apply_after_silu_and_mul(self, layer: nn.Module, gate_up: torch.Tensor,
                                 bias: torch.Tensor | None = None) -> torch.Tensor:
        if layer.packed is not None:
            return layer.packed.after_silu_and_mul(gate_up)
        return F.linear(silu_and_mul(gate_up), layer.weight, bias)

    def move_to(self, layer: nn.Module, allocate: Allocate) -> None:
        if layer.packed is not None:
            layer.packed.move_to(allocate)
