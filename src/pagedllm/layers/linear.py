"""Linear layers whose CPU forward runs on a weight reordered once for oneDNN.

A weight packed once into oneDNN's blocked layout runs prefill-sized GEMMs faster than
`F.linear` on the plain weight (about 136 against 100 GFLOP/s at 2048 rows here) and
decode-sized ones about as fast (benchmarks/linear.py, docs/benchmarks.md). It matters most
on CPUs without a bf16 GEMM (no AVX-512 / AVX-NE-CONVERT), where torch's bf16 matmul falls back
to a path 10-100x slower: there a bf16 layer keeps a packed fp32 copy of its weight. bf16
inputs are exact in fp32 and a bf16 GEMM accumulates in fp32 anyway, so the result is the bf16
GEMM's up to summation order, at the cost of 4 bytes per weight.

A call with at most FEW_ROWS rows (decode of a few sequences) is bound by reading the weight,
not by arithmetic: it goes to pagedllm's weight-streaming kernel over the plain weight
(`ops/csrc/gemv.cpp`), which reads a bf16 weight at 2 bytes per value. The plain weight is kept
for it next to the packed copy.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from pagedllm.ops import cpu_ops

logger = logging.getLogger(__name__)

# Up to this many rows, the weight-streaming kernel beats oneDNN (docs/benchmarks.md).
FEW_ROWS = 8


class PackedWeight:
    """A [out, in] weight (and bias) in oneDNN's layout; call it like F.linear(x, weight, bias)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, batch_hint: int) -> None:
        try:
            self.weight = torch.ops.mkldnn._reorder_linear_weight(weight, batch_hint)
            self.compute_dtype = weight.dtype
        except RuntimeError:
            if weight.dtype == torch.float32:
                raise
            # This CPU has no bf16/fp16 GEMM in oneDNN: compute in fp32 (see module docstring).
            self.weight = torch.ops.mkldnn._reorder_linear_weight(weight.float(), batch_hint)
            self.compute_dtype = torch.float32
        self.bias = None if bias is None else bias.detach().to(self.compute_dtype)
        self.ops = cpu_ops() if weight.dtype in (torch.float32, torch.bfloat16) else None
        # The few-rows kernel's operands: the weight as loaded, and an fp32 bias (or empty).
        self.plain = weight.contiguous() if self.ops is not None else None
        self.plain_bias = (torch.empty(0) if bias is None
                           else bias.detach().float().contiguous())

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        # x: [num_tokens, in] -> [num_tokens, out] in x's dtype
        if (self.plain is not None and x.dim() == 2 and x.shape[0] <= FEW_ROWS
                and x.dtype in (torch.float32, torch.bfloat16)):
            return self.few_rows(x)
        return self.onednn(x)

    def few_rows(self, x: torch.Tensor) -> torch.Tensor:
        """The weight-streaming kernel over the plain weight (needs the CPU ops)."""
        out = x.new_empty(x.shape[0], self.plain.shape[0])
        self.ops.linear_few_rows(out, x, self.plain, self.plain_bias)
        return out

    def onednn(self, x: torch.Tensor) -> torch.Tensor:
        """oneDNN over the packed weight."""
        inputs = x if x.dtype == self.compute_dtype else x.to(self.compute_dtype)
        out = torch.ops.mkldnn._linear_pointwise(inputs, self.weight, self.bias, "none", [], "")
        return out if out.dtype == x.dtype else out.to(x.dtype)


def try_pack(weight: torch.Tensor, bias: torch.Tensor | None = None,
             batch_hint: int = 64) -> PackedWeight | None:
    """A PackedWeight for a CPU weight, or None where oneDNN cannot take it (other device,
    dtype or platform): callers then keep F.linear."""
    if (
        weight.device.type != "cpu"
        or weight.dtype not in (torch.float32, torch.bfloat16, torch.float16)
        or not torch.backends.mkldnn.is_available()
    ):
        return None
    try:
        return PackedWeight(weight.detach(), bias, batch_hint)
    except RuntimeError as exc:
        logger.info("keeping F.linear: oneDNN cannot pack a %s weight (%s)", weight.dtype, exc)
        return None


class Linear(nn.Linear):
    """nn.Linear that switches to a packed copy of its weight after `pack()`.

    Packing drops the plain weight (the packed copy replaces it), so it happens once the
    checkpoint is loaded, and only for a model that stays on the CPU.
    """

    packed: PackedWeight | None = None

    def pack(self, batch_hint: int = 64) -> bool:
        """Packs the weight for oneDNN; False (and nothing changes) where it cannot."""
        packed = try_pack(self.weight, self.bias, batch_hint)
        if packed is None:
            return False
        self.packed = packed
        self.weight = nn.Parameter(self.weight.new_empty(0), requires_grad=False)
        return True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is not None:
            return self.packed(x)
        return super().forward(x)


def pack_linear_layers(model: nn.Module, batch_hint: int = 64) -> int:
    """Packs every `Linear` of a loaded CPU model; returns how many were packed."""
    return sum(m.pack(batch_hint) for m in model.modules() if isinstance(m, Linear))
