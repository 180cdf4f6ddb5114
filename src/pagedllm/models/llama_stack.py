"""The Llama decoder stack as one native call on CPU (`llama_decoder_stack`, ops/csrc).

The per-module forward calls ~8 fused C++ ops per layer from Python; this runs the same ops in
the same order from C++ (bit-identical results) and saves the Python between them. Under
tensor parallelism each rank runs it on its shards, and the op all-reduces the o and down
projections' partial sums through the group's shared buffer (distributed/shm_comm.py), so
the ranks stay in one native call per step. It applies
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
from pagedllm.ops import NATIVE_DTYPES, cpu_ops
from pagedllm.profiler import StepProfiler

if TYPE_CHECKING:
    from pagedllm.models.llama import LlamaForCausalLM

# The parts the C++ op times per layer when profiling, in its order (`Part` in
# decoder_stack.cpp): the two blocks, named as the module path's hooks name theirs
# (LlamaForCausalLM.profiled_modules), then the kinds of work across both, which sum to them.
PART_NAMES = ("attention block", "mlp", "norms + rotary", "attention projections",
              "attention kernel", "mlp projections")


def _or_empty(t: torch.Tensor | None) -> torch.Tensor:
    return torch.empty(0) if t is None else t


class NativeDecoderStack:
    """The layers and final norm of a packed CPU Llama model, run by one C++ call per step."""

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
        self.cos_table, self.sin_table = attention.rotary.float_tables()
        self.dtype = model.embed_tokens.weight.dtype
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
        self.router: PackedWeight = linears[0]
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
        self._checked_caches: list[torch.Tensor] | None = None
        self.profiler: StepProfiler | None = None
        # Under tensor parallelism the op all-reduces the row-parallel outputs (o, down) in
        # place through the group's shared buffer, between the parts of each layer.
        tp = get_tp_group()
        self.tp_rank, self.tp_size = tp.rank, tp.world_size
        self.comm = tp.shm

    @classmethod
    def build(cls, model: LlamaForCausalLM) -> NativeDecoderStack | None:
        """The stack for a packed CPU model, or None where some layer part is not native."""
        ops = cpu_ops()
        if ops is None or not hasattr(ops, "llama_decoder_stack") or len(model.layers) == 0:
            return None
        if model.embed_tokens.weight.device.type != "cpu":
            return None
        if model.embed_tokens.weight.dtype not in NATIVE_DTYPES:
            return None
        tp = get_tp_group()
        if tp.world_size > 1 and tp.shm is None:
            return None  # ranks without a shared buffer (not one host): collectives in Python
        rotaries = {id(layer.self_attn.rotary) for layer in model.layers}
        backends = {id(layer.self_attn.backend) for layer in model.layers}
        if len(rotaries) != 1 or len(backends) != 1:
            return None
        if not isinstance(model.layers[0].self_attn.backend, CpuPagedAttention):
            return None  # another backend was asked for; the stack would bypass it
        packed = []
        for layer in model.layers:
            norms = (layer.input_layernorm, layer.post_attention_layernorm)
            if any(n.weight.dtype not in NATIVE_DTYPES or n.eps != model.norm.eps for n in norms):
                return None
            linears = (layer.self_attn.qkv_proj, layer.self_attn.o_proj,
                       layer.mlp.gate_up_proj, layer.mlp.down_proj)
            packed.extend(lin.packed for lin in linears)
        if model.norm.weight.dtype not in NATIVE_DTYPES or any(p is None for p in packed):
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
            seconds = torch.zeros(len(PART_NAMES), dtype=torch.float64)
        out = self.ops.llama_decoder_stack(
            hidden.contiguous(),
            positions if positions.dtype == torch.int64 else positions.long(),
            self.weights[path],
            kv_caches,
            *kernel_metadata(metadata),
            self.cos_table,
            self.sin_table,
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
        )
        if seconds is not None:
            for name, value in zip(PART_NAMES, seconds.tolist()):
                self.profiler.record(name, value, self.num_layers)
        return out

