"""The Llama decoder stack as one native call on CPU (`llama_decoder_stack`, ops/csrc).

The per-module forward calls ~8 fused C++ ops per layer from Python; this runs the same ops in
the same order from C++ (bit-identical results) and saves the Python between them. The
families built on Llama's layers (Mistral, Qwen2, Qwen3, Phi-3) take it too: what differs is
passed per layer (each attention's sliding window, Qwen3's per-head q/k norms; biases ride
with the weights, Phi-3's LongRoPE with the rotary table, which is per position). Layers
quantized with GGUF blocks or int8 rows take it on the op's quantized path, which calls the
kernels the linear methods call (one format per projection). Under
tensor parallelism each rank runs it on its shards, and the op all-reduces the o and down
projections' partial sums through the group's shared buffer (distributed/shm_comm.py), or
where the ranks share no host through the process group (distributed/pg_comm.py), so the
ranks stay in one native call per step. It applies
where every part runs as the module path would run it natively: projections packed for the
CPU (panels, the streaming kernel or oneDNN, whichever the step's row count picks), the
`cpu_paged` attention kernel on this cache, rotary and norms in fp32/bf16. Anywhere else
(reference attention, a failed build, a GPU) the model keeps its per-module path, which stays
the readable definition of the layer.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from pagedllm.attention.backend import AttentionMetadata
from pagedllm.attention.cpu_paged import CpuPagedAttention, kernel_applies, kernel_metadata
from pagedllm.distributed import get_tp_group
from pagedllm.layers.linear import (
    AMX_PANELS,
    DOT_PANELS,
    ONEDNN,
    PANELS,
    STREAMING,
    PackedWeight,
)
from pagedllm.layers.norm import RMSNorm
from pagedllm.layers.quantization.base import LinearMethodBase
from pagedllm.layers.quantization.gguf import GGUFLinearMethod
from pagedllm.layers.quantization.int8 import Int8LinearMethod
from pagedllm.ops import NATIVE_DTYPES, cpu_ops
from pagedllm.profiler import StepProfiler

if TYPE_CHECKING:
    from torch import nn

    from pagedllm.models.llama import LlamaForCausalLM

# The op's path for quantized projections (`kQuantized` in decoder_stack.cpp), after the dense
# ones (layers/packed.py: PANELS .. AMX_PANELS).
QUANTIZED = 5
# The format id of an int8 layer (ops/csrc/quant.h: kInt8Channel); GGUF's are GGML type ids.
INT8_FORMAT = 1000

# The parts the C++ op times per layer when profiling, in its order (`Part` in
# decoder_stack.cpp): the two blocks, named as the module path's hooks name theirs
# (LlamaForCausalLM.profiled_modules), then the kinds of work across both, which sum to them
# with the all-reduce under tensor parallelism (the row-parallel sums and the wait for the
# other ranks).
PART_NAMES = ("attention block", "mlp", "norms + rotary", "attention projections",
              "attention kernel", "mlp projections")
# Timed after them, under tensor parallelism only.
ALL_REDUCE_PART = "all-reduce"


def _or_empty(t: torch.Tensor | None) -> torch.Tensor:
    return torch.empty(0) if t is None else t


# A run of a quantized layer's output columns, one kernel call: (format, columns, weight,
# bias, scales), with an empty bias where none and empty scales for GGUF blocks.
QuantRun = tuple[int, int, torch.Tensor, torch.Tensor, torch.Tensor]


def quantized_runs(linear: nn.Module) -> list[QuantRun] | None:
    """The runs of a layer whose method multiplies by quantized kernels alone, as its apply()
    calls them; None otherwise (a dense layer, a GGUF layer with a float part, a method whose
    gated forms are not apply() after the separate silu_and_mul op)."""
    method = linear.linear_method
    if method.fuses_swiglu(linear) or (
        type(method).apply_after_silu_and_mul is not LinearMethodBase.apply_after_silu_and_mul
    ):
        return None
    if type(method) is GGUFLinearMethod:
        if any(run.ggml_type is None for run in linear.gguf_runs):
            return None
        return [(run.ggml_type, run.size, run.weight, _or_empty(run.bias), torch.empty(0))
                for run in linear.gguf_runs]
    if type(method) is Int8LinearMethod and linear.int8_weight is not None:
        return [(INT8_FORMAT, linear.int8_weight.shape[0], linear.int8_weight,
                 _or_empty(linear.int8_bias), linear.int8_scales)]
    return None


def _projections(layer: nn.Module) -> tuple[nn.Module, nn.Module, nn.Module, nn.Module]:
    return (layer.self_attn.qkv_proj, layer.self_attn.o_proj, layer.mlp.gate_up_proj,
            layer.mlp.down_proj)


def _runs_as_llama(model: LlamaForCausalLM) -> bool:
    """Whether every layer's forward is Llama's, the arithmetic the op runs (a family may
    differ only where the op takes a per-layer description: windows, head norms)."""
    from pagedllm.models.llama import LlamaAttention, LlamaDecoderLayer, LlamaMLP

    for layer in model.layers:
        attention = layer.self_attn
        if (type(layer).forward is not LlamaDecoderLayer.forward
                or type(attention).forward is not LlamaAttention.forward
                or type(layer.mlp).forward is not LlamaMLP.forward):
            return False
        if (type(attention).split_heads is not LlamaAttention.split_heads
                and attention.head_norms() is None):
            return False  # heads transformed in a way the op is not told about
        norms = [layer.input_layernorm, layer.post_attention_layernorm,
                 *(attention.head_norms() or ())]
        if any(type(n) is not RMSNorm or n.weight.dtype not in NATIVE_DTYPES
               or n.eps != model.norm.eps for n in norms):
            return False
    return type(model.norm) is RMSNorm and model.norm.weight.dtype in NATIVE_DTYPES


class NativeDecoderStack:
    """The layers and final norm of a Llama-family CPU model (packed or quantized
    projections), run by one C++ call per step."""

    def __init__(self, model: LlamaForCausalLM, ops) -> None:
        self.ops = ops
        layers = model.layers
        attention = layers[0].self_attn
        self.num_layers = len(layers)
        self.num_heads = attention.num_heads
        self.num_kv_heads = attention.num_kv_heads
        self.head_size = attention.head_size
        self.intermediate_size = layers[0].mlp.down_proj.in_features
        self.scale = attention.backend.scale
        self.eps = model.norm.eps
        self.final_norm = model.norm.weight.detach()
        # Read each step: a family may refill the table after packing (Phi-3's LongRoPE).
        self.rotary = attention.rotary
        self.dtype = model.norm.weight.dtype
        # The per-layer description: each layer's window (0: none) and q/k head norms.
        self.windows = [layer.self_attn.backend.sliding_window or 0 for layer in layers]
        head_norms = [layer.self_attn.head_norms() for layer in layers]
        self.head_norms = [] if head_norms[0] is None else [
            norm.weight.detach() for q_norm, k_norm in head_norms for norm in (q_norm, k_norm)]
        self.weights: dict[int, list[torch.Tensor]] = {}
        # The quantized path's projections: per projection its number of runs, then each
        # run's format and columns; per run its weight, bias and scales.
        self.quant_layout: list[int] = []
        self.quant_tensors: list[torch.Tensor] = []
        self.router: PackedWeight | None = None
        if layers[0].self_attn.qkv_proj.packed is None:  # quantized (build() checks)
            tensors = []
            unused = torch.empty(0)  # the projections' slots: their runs are passed apart
            for layer in layers:
                tensors += [layer.input_layernorm.weight.detach(), *[unused] * 4,
                            layer.post_attention_layernorm.weight.detach(), *[unused] * 4]
                for linear in _projections(layer):
                    runs = quantized_runs(linear)
                    self.quant_layout.append(len(runs))
                    for fmt, columns, weight, bias, scales in runs:
                        self.quant_layout += [fmt, columns]
                        self.quant_tensors += [weight, bias, scales]
            self.weights[QUANTIZED] = tensors
            self._init_common(model)
            return
        projections = [
            (layer.input_layernorm.weight.detach(), layer.self_attn.qkv_proj.packed,
             layer.self_attn.o_proj.packed, layer.post_attention_layernorm.weight.detach(),
             layer.mlp.gate_up_proj.packed, layer.mlp.down_proj.packed)
            for layer in layers
        ]
        linears = [p for _, qkv, o, _, gate_up, down in projections
                   for p in (qkv, o, gate_up, down)]
        # Every projection of a model shares its dtype and so its row-count switch points
        # (build() checks): the first one chooses each step's path for all of them.
        self.router = linears[0]
        # path -> the per-layer tensors in that path's form; a path some weight lacks is absent.
        forms = {
            PANELS: lambda p: (p.panels, p.plain_bias),
            STREAMING: lambda p: (p.plain, p.plain_bias),
            ONEDNN: lambda p: (p.onednn_weight, _or_empty(p.bias)),
            DOT_PANELS: lambda p: (p.dot_panels, p.plain_bias),
            AMX_PANELS: lambda p: (p.amx_panels, p.plain_bias),
        }
        self.weights: dict[int, list[torch.Tensor]] = {}
        for path, form in forms.items():
            if not all(form(p)[0] is not None for p in linears):
                continue
            if path == ONEDNN and any(p.compute_dtype != self.dtype for p in linears):
                continue  # oneDNN would compute in another dtype, with conversions around it
            tensors = []
            for in_norm, qkv, o, post_norm, gate_up, down in projections:
                tensors += [in_norm, *form(qkv), *form(o), post_norm, *form(gate_up),
                            *form(down)]
            self.weights[path] = tensors
        self._init_common(model)

    def _init_common(self, model: LlamaForCausalLM) -> None:
        self._checked_caches: list[torch.Tensor] | None = None
        self.profiler: StepProfiler | None = None
        # Under tensor parallelism the op all-reduces the row-parallel outputs (o, down) in
        # place between the parts of each layer: through the group's shared buffer on one
        # host, else through the process group's op (pagedllm_tp::all_reduce, registered by
        # importing pg_comm).
        tp = get_tp_group()
        self.tp_rank, self.tp_size = tp.rank, tp.world_size
        self.comm = tp.shm
        if self.tp_size > 1 and self.comm is None:
            import pagedllm.distributed.pg_comm  # noqa: F401
        # Calls of the op, read by tests and benchmarks (the stack ran, not the modules).
        self.num_calls = 0

    @classmethod
    def build(cls, model: LlamaForCausalLM) -> NativeDecoderStack | None:
        """The stack for a packed or quantized CPU model, or None where some layer part is not
        native (or not what the op runs)."""
        ops = cpu_ops()
        if ops is None or not hasattr(ops, "llama_decoder_stack") or len(model.layers) == 0:
            return None
        if model.norm.weight.device.type != "cpu" or not _runs_as_llama(model):
            return None
        rotaries = {id(layer.self_attn.rotary) for layer in model.layers}
        if len(rotaries) != 1:
            return None
        backends = [layer.self_attn.backend for layer in model.layers]
        if not all(isinstance(b, CpuPagedAttention) for b in backends):
            return None  # another backend was asked for; the stack would bypass it
        # One scale for the model; windows per layer; no soft cap (none of these families).
        if any(b.scale != backends[0].scale or b.logits_soft_cap is not None for b in backends):
            return None
        if len({layer.self_attn.head_norms() is None for layer in model.layers}) != 1:
            return None
        linears = [linear for layer in model.layers for linear in _projections(layer)]
        if all(linear.packed is None for linear in linears):  # quantized, all of them
            return cls(model, ops) if all(quantized_runs(linear) is not None
                                          for linear in linears) else None
        packed = [linear.packed for linear in linears]
        if any(p is None for p in packed):
            return None
        switch_points = {(p.stream_max_rows, p.panel_max_rows, p.dot_panels is None,
                          p.amx_panels is None) for p in packed}
        if len(switch_points) != 1:
            return None
        # On the dot-product path the op gates in the gate_up GEMM, so every gate_up weight must
        # be packed for it, and no other weight.
        if packed[0].dot_panels is not None and any(
            p.fuses_swiglu != (i % 4 == 2) for i, p in enumerate(packed)
        ):
            return None
        return cls(model, ops)

    def linear_path(self, rows: int) -> int | None:
        """The projections' path for a step of `rows` tokens, None where the stack lacks it."""
        if self.router is None:
            return QUANTIZED
        path = self.router.path(rows)
        return path if path in self.weights else None

    def applies(self, hidden: torch.Tensor, kv_caches: list[torch.Tensor]) -> bool:
        """Whether this step's batch (hidden: [num_tokens, hidden]) and caches take the stack."""
        if hidden.dtype != self.dtype or self.linear_path(hidden.shape[0]) is None:
            return False
        if kv_caches is not self._checked_caches:  # the runner passes the same list every step
            if len(kv_caches) != self.num_layers or not all(
                kernel_applies(hidden, hidden, hidden, cache) for cache in kv_caches
            ):
                return False
            self._checked_caches = kv_caches
        return True

    def __call__(
        self,
        hidden: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[torch.Tensor],
        metadata: AttentionMetadata,
    ) -> torch.Tensor:
        """hidden (the embeddings): [num_tokens, hidden] -> the final norm's output."""
        path = self.linear_path(hidden.shape[0])
        seconds = None
        if self.profiler is not None and self.profiler.enabled:
            seconds = torch.zeros(len(PART_NAMES) + 1, dtype=torch.float64)
        cos_table, sin_table = self.rotary.float_tables()
        self.num_calls += 1
        out = self.ops.llama_decoder_stack(
            hidden.contiguous(),
            positions if positions.dtype == torch.int64 else positions.long(),
            self.weights[path],
            kv_caches,
            *kernel_metadata(metadata),
            cos_table,
            sin_table,
            self.final_norm,
            self.num_heads,
            self.num_kv_heads,
            self.head_size,
            self.intermediate_size,
            self.eps,
            self.scale,
            path,
            seconds,
            None if self.comm is None else self.comm.buffer,
            self.tp_rank,
            self.tp_size,
            None if self.comm is None else self.comm.generation,
            self.windows,
            self.head_norms,
            self.quant_layout,
            self.quant_tensors,
        )
        if seconds is not None:
            names = PART_NAMES + ((ALL_REDUCE_PART,) if self.tp_size > 1 else ())
            for name, value in zip(names, seconds.tolist()):
                self.profiler.record(name, value, self.num_layers)
        return out

