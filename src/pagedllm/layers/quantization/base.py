"""The linear-method seam (vLLM's `QuantizeMethodBase`/`LinearMethodBase`): how a linear layer
stores its weight and multiplies by it.

Every linear layer (layers/linear.py: `ReplicatedLinear`, the column- and row-parallel layers,
the LM head) owns the shapes and the sharding; its *linear method* owns the parameters and the
arithmetic. A layer asks its model's `QuantizationConfig` for one
(`get_linear_method(layer, prefix)`; no config means `UnquantizedLinearMethod`, the dense
packed-weight kernels of layers/quantization/dense.py) and then only ever calls:

    create_weights(layer, input_size_per_partition, output_partition_sizes, input_size,
                   output_size, params_dtype, weight_loader=...)   # in the layer's __init__
    process_weights_after_loading(layer)                           # once, after the checkpoint
    apply(layer, x, bias)                                          # every forward

What a quantized method (e.g. gguf.py, int8.py) must provide:

1. `create_weights` registers the layer's parameters with `layer.register_parameter(name, p)`,
   shaped for this rank's partition: `output_partition_sizes` are this rank's rows of each
   fused part (q/k/v, gate/up; one entry for a plain layer), `input_size_per_partition` its
   columns. The model is built on the meta device, so allocate with torch.empty and never
   fill. Give every parameter, with `set_weight_attrs(p, {...})`:
   - `weight_loader`: the layer's own (passed in as the keyword `weight_loader`), or the
     method's own for a checkpoint tensor the layer cannot narrow as a dense [out, in]
     matrix. It is called as `weight_loader(param, loaded_weight, shard_id)` with the whole
     checkpoint tensor (shard_id: the fused part's index, or None); the layer's narrows it
     along the parameter's `output_dim` / `input_dim` attributes to this rank's shard and
     copies it in, so set those where the tensor splits like the dense weight (e.g.
     per-row scales: `output_dim=0`), and leave them out where every rank needs it whole.
   - A parameter the checkpoint does not hold must not be registered (the loader refuses a
     model with an unfilled parameter); build it in process_weights_after_loading instead.
2. `process_weights_after_loading(layer)` turns the loaded parameters into what `apply` runs
   on (repacks, dequantizes, moves to the CPU kernels' layouts). It may replace parameters
   (e.g. by empty ones) and set plain attributes. Read `layer.batch_invariant` (see below).
   `layer.packed` must stay None unless the result is a dense `PackedWeight`: the native
   decoder stack (models/llama_stack.py) runs only on dense packed weights, and a model whose
   layers have none keeps its per-module forward.
3. `apply(layer, x, bias)`: x is [..., input_size_per_partition] in the model's dtype; return
   x @ W.T (+ bias when given) as [..., sum(output_partition_sizes)] in x's dtype. The layer
   adds nothing after it except the row-parallel all-reduce. `bias` is None where this rank
   must not add it (row-parallel ranks > 0); when the method folded the bias in while
   processing weights, it gets the same bias here and must not add it twice.
4. Batch invariance (docs: tests/engine/test_batch_invariance.py): a row's output must not
   depend on the number of rows in the call. Sum each output in one order for every row
   count, or document that the method is not covered.
Optional, with defaults here that compose `apply` with the separate op:
`apply_swiglu(layer, x)` (silu(gate) * up of a [gate | up] projection),
`apply_after_silu_and_mul(layer, gate_up)` (this layer over silu(gate) * up), `fuses_swiglu`
and `move_to(layer, allocate)` (copy what the kernels stream into the worker's huge pages).

A `QuantizationConfig` is built from the checkpoint (its `quantization_config` or the GGUF
types) and handed to the model; `get_linear_method` may answer per layer (e.g. None-like dense
for the LM head) by the layer's `prefix` (its parameter path, e.g. `layers.0.mlp.down_proj`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from pagedllm.layers.activation import silu_and_mul

# allocate(shape, dtype) -> an empty tensor to move a packed tensor into (the huge-page arena).
Allocate = Callable[[Sequence[int], torch.dtype], torch.Tensor]


def set_weight_attrs(param: torch.Tensor, attrs: dict[str, Any] | None) -> None:
    """Sets loader attributes (weight_loader, output_dim, input_dim, ...) on a parameter."""
    for key, value in (attrs or {}).items():
        if hasattr(param, key) and key not in param.__dict__:
            raise KeyError(f"overwriting the tensor attribute {key!r}")
        setattr(param, key, value)


class LinearMethodBase(ABC):
    """How a linear layer holds its weight and computes x @ W.T + b (see the module docstring)."""

    @abstractmethod
    def create_weights(self, layer: nn.Module, input_size_per_partition: int,
                       output_partition_sizes: list[int], input_size: int, output_size: int,
                       params_dtype: torch.dtype, **extra_weight_attrs: Any) -> None:
        """Registers this rank's parameters on `layer`, each with `extra_weight_attrs`
        (`weight_loader`) set on it."""

    @abstractmethod
    def process_weights_after_loading(self, layer: nn.Module) -> None:
        """Turns the loaded parameters into what apply() runs on."""

    @abstractmethod
    def apply(self, layer: nn.Module, x: torch.Tensor,
              bias: torch.Tensor | None = None) -> torch.Tensor:
        """x: [..., in_per_partition] -> x @ W.T (+ bias): [..., out_per_partition]."""

    def fuses_swiglu(self, layer: nn.Module) -> bool:
        """Whether apply_swiglu gates inside the GEMM (so apply() may be unavailable)."""
        return False

    def apply_swiglu(self, layer: nn.Module, x: torch.Tensor,
                     bias: torch.Tensor | None = None) -> torch.Tensor:
        """silu(gate) * up of this [gate | up] projection of x."""
        return silu_and_mul(self.apply(layer, x, bias))

    def apply_after_silu_and_mul(self, layer: nn.Module, gate_up: torch.Tensor,
                                 bias: torch.Tensor | None = None) -> torch.Tensor:
        """This projection over silu(gate) * up of gate_up = [gate | up]."""
        return self.apply(layer, silu_and_mul(gate_up), bias)

    def move_to(self, layer: nn.Module, allocate: Allocate) -> None:
        """Moves the tensors the kernels stream into tensors from allocate(shape, dtype)."""


class QuantizationConfig(ABC):
    """A checkpoint's quantization: which linear method each layer gets."""

    @abstractmethod
    def get_name(self) -> str:
        """The method's name as settings and errors spell it (e.g. "gguf", "int8")."""

    @abstractmethod
    def get_linear_method(self, layer: nn.Module, prefix: str) -> LinearMethodBase | None:
        """The method of the layer at `prefix`, or None for the dense one."""


class WeightShapeError(ValueError):
    """A checkpoint tensor whose shape is not the one the config gives its parameter; the
    loader names the tensor (models/interface.py)."""

    def __init__(self, shape: tuple[int, ...], expected: tuple[int, ...]) -> None:
        super().__init__(f"has shape {shape}, but the config makes it {expected}")
        self.shape, self.expected = shape, expected
