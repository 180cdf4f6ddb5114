"""The GGUF linear method: weights kept in their GGUF block formats, multiplied by the
quantized kernels (ops/csrc/quant_*.cpp) times activations quantized per row on the fly, to
16-bit integers per block of 32 (ACTIVATIONS_ENV selects 8 bits per 32 or per 16 inputs for
the layers; the LM head keeps 16). llama.cpp quantizes them to int8 per 32, which kept 96.2%
top-1 agreement on the shipped SmolLM2 with the file dequantized to fp32; 16-bit blocks keep
99.99%, 8 bits per 16 in the layers 97.68%.

The loader (models/gguf_loader.py) hands each layer the file's tensors: a quantized tensor as
its raw blocks, uint8 [rows, bytes per row] with the attribute `ggml_type` (a GGML type id the
kernels take: Q8_0, Q4_0, Q4_1, Q4_K, Q5_K, Q6_K), anything else already dequantized to
float (the loader warns once per type). A fused layer (q | k | v, gate | up) may mix types, so
each part is kept apart; runs of parts of one type are multiplied in one call, each writing its
columns of the output. After loading, a run's blocks (every type with a kernel: Q4_0, Q4_1,
Q8_0, Q4_K, Q5_K, Q6_K) are repacked in place into panels of 16 rows (ops/csrc/quant_panels.cpp:
the same bytes, interleaved for the integer dot products); the run's format becomes the panel format's id (PANEL_FORMAT + its GGML type),
recorded on the bytes' storage too, so that a tied token embedding over the same bytes looks
its rows up in that layout.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pagedllm.layers.linear import KeepsParamAttrs
from pagedllm.layers.packed import PackedWeight, try_pack
from pagedllm.layers.quantization.base import (
    LinearMethodBase,
    QuantizationConfig,
    WeightShapeError,
    set_weight_attrs,
)
from pagedllm.ops import cpu_ops

# GGML type id -> (name, values per block, bytes per block), for the types with a kernel.
KERNEL_TYPES = {
    2: ("Q4_0", 32, 18),
    3: ("Q4_1", 32, 20),
    8: ("Q8_0", 32, 34),
    12: ("Q4_K", 256, 144),
    13: ("Q5_K", 256, 176),
    14: ("Q6_K", 256, 210),
}
_QKV_IDS = {"q": 0, "k": 1, "v": 2}
# The panel formats' ids: PANEL_FORMAT + the GGML type (ops/csrc/quant.h: kPanelFormat).
PANEL_FORMAT = 2000
PANEL_TYPES = (2, 3, 8, 12, 13, 14)  # Q4_0, Q4_1, Q8_0, Q4_K, Q5_K, Q6_K


def check_quantized_shape(raw: torch.Tensor, ggml_type: int, rows: int, in_features: int,
                          what: str) -> None:
    """Refuses blocks that cannot be a [rows, in_features] weight of this type."""
    name, values, nbytes = KERNEL_TYPES[ggml_type]
    if in_features % values:
        raise ValueError(f"{what}: {name} stores blocks of {values} values, but the input "
                         f"dimension is {in_features}, not a multiple of {values}")
    expected = (rows, in_features // values * nbytes)
    if tuple(raw.shape) != expected:
        raise WeightShapeError(tuple(raw.shape), expected)


@dataclass
class _Run:
    """Consecutive output columns [start, start + size) computed by one call."""

    start: int
    size: int
    ggml_type: int | None  # None: a float part (packed dense, or plain F.linear)
    weight: torch.Tensor | None = None  # quantized: raw blocks; float: the plain weight
    bias: torch.Tensor | None = None  # fp32, the run's columns
    packed: PackedWeight | None = None


class GGUFLinearMethod(LinearMethodBase):
    """One part per fused output (layer.gguf_parts), each raw blocks or a float weight."""

    def create_weights(self, layer: nn.Module, input_size_per_partition: int,
                       output_partition_sizes: list[int], input_size: int, output_size: int,
                       params_dtype: torch.dtype, **extra_weight_attrs: Any) -> None:
        # NOTE: a placeholder the loader addresses by name; the blocks live in gguf_parts.
        weight = nn.Parameter(torch.empty(1, dtype=torch.uint8), requires_grad=False)
        set_weight_attrs(weight, {"weight_loader": self._make_loader(layer)})
        layer.register_parameter("weight", weight)
        # Empty, but converted with the model (model.to(dtype)): the dtype of its float parts.
        layer.register_buffer("gguf_dtype", torch.empty(0, dtype=params_dtype), persistent=False)
        layer.gguf_parts = [None] * len(output_partition_sizes)
        layer.gguf_runs = []

    @staticmethod
    def _make_loader(layer: nn.Module):
        def weight_loader(param: nn.Parameter, loaded: torch.Tensor,
                          shard_id: int | str | None = None) -> None:
            GGUFLinearMethod.load_part(layer, loaded, shard_id)
        return weight_loader

    @staticmethod
    def load_part(layer: nn.Module, loaded: torch.Tensor, shard_id: int | str | None) -> None:
        """Keeps this rank's rows (and inputs) of one checkpoint tensor as part `shard_id`."""
        if isinstance(shard_id, str):
            shard_id = _QKV_IDS[shard_id]
        ggml_type = getattr(loaded, "ggml_type", None)
        if shard_id is None and len(layer.output_sizes) > 1:  # a fused tensor stored whole
            start = 0
            for part, size in enumerate(layer.output_sizes):
                piece = loaded[start:start + size]
                if ggml_type is not None:
                    piece.ggml_type = ggml_type
                GGUFLinearMethod.load_part(layer, piece, part)
                start += size
            return
        part = shard_id or 0
        rows = layer.output_sizes[part]
        if ggml_type is not None:
            check_quantized_shape(loaded, ggml_type, rows, layer.input_size,
                                  layer.prefix or "a GGUF layer")
        elif tuple(loaded.shape) != (rows, layer.input_size):
            raise WeightShapeError(tuple(loaded.shape), (rows, layer.input_size))
        size = layer.output_partition_sizes[part]
        loaded = loaded.narrow(0, layer.output_shard_ranks[part] * size, size)
        if layer.splits_input and layer.tp_size > 1:
            in_size = layer.input_size_per_partition
            if ggml_type is not None:
                name, values, nbytes = KERNEL_TYPES[ggml_type]
                if in_size % values:
                    raise ValueError(f"{layer.prefix}: {in_size} inputs per rank split {name}'s "
                                     f"blocks of {values}; use fewer ranks or quantization="
                                     f"'none'")
                width = in_size // values * nbytes
                loaded = loaded.narrow(1, layer.tp_rank * width, width)
            else:
                loaded = loaded.narrow(1, layer.tp_rank * in_size, in_size)
        # NOTE: the loader's tensors are copies already; a view of a bigger one is cloned.
        whole = loaded.is_contiguous() and loaded.untyped_storage().nbytes() == loaded.nbytes
        kept = loaded if whole else loaded.contiguous().clone()
        if ggml_type is not None:
            kept.ggml_type = ggml_type
        layer.gguf_parts[part] = kept

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        if any(p is None for p in layer.gguf_parts):
            raise ValueError(f"{layer.prefix}: a GGUF part was never loaded")
        bias = layer.rank_bias()
        bias = None if bias is None else bias.detach().float().contiguous()
        ops = cpu_ops()
        runs: list[_Run] = []
        pieces: list[list[torch.Tensor]] = []  # each run's parts, joined in one copy below
        start = 0
        for part in layer.gguf_parts:
            ggml_type = getattr(part, "ggml_type", None)
            if ggml_type is not None and ops is None:  # no kernels here: dequantize
                part, ggml_type = _dequantize(part, ggml_type, layer.input_size_per_partition), None
            rows = part.shape[0]
            if runs and runs[-1].ggml_type == ggml_type:  # float parts (None) join too
                pieces[-1].append(part)
                runs[-1].size += rows
            else:
                runs.append(_Run(start, rows, ggml_type, part))
                pieces.append([part])
            start += rows
        for run, parts in zip(runs, pieces):
            if len(parts) > 1:
                run.weight = torch.cat(parts)
            run_bias = None if bias is None else bias[run.start:run.start + run.size]
            run.bias = run_bias
            if run.ggml_type is not None:
                run.ggml_type = _pack_panels(run.weight, run.ggml_type)
            if run.ggml_type is None:
                dtype = layer.gguf_dtype.dtype
                run.weight = run.weight.to(dtype)
                run.packed = try_pack(run.weight, None if run_bias is None else run_bias.to(dtype),
                                      layer.batch_hint, False, layer.batch_invariant)
                if run.packed is not None:  # apply reads the packing only
                    run.weight = None
        layer.gguf_runs = runs
        layer.gguf_parts = []

    def apply(self, layer: nn.Module, x: torch.Tensor,
              bias: torch.Tensor | None = None) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if x2.dtype not in (torch.float32, torch.bfloat16) or x2.stride(-1) != 1:
            x2 = x2.float().contiguous()
        # NOTE: the LM head's logits stay fp32 (compute_logits reads them as fp32).
        logits = layer.prefix.endswith("lm_head")
        out = torch.empty(x2.shape[0], layer.out_features, device=x2.device,
                          dtype=torch.float32 if logits else x2.dtype)
        ops = cpu_ops()
        empty = torch.empty(0)
        for run in layer.gguf_runs:
            cols = out[:, run.start:run.start + run.size]
            run_bias = run.bias if bias is not None else None
            if run.ggml_type is not None:
                # The LM head keeps 16-bit activations (HEAD_ACTIVATIONS); the layers take the
                # process's (0, 0: set_gguf_activations), as the decoder stack does.
                bits, group = HEAD_ACTIVATIONS if logits else (0, 0)
                ops.gguf_linear(cols, x2, run.weight, run.ggml_type,
                                empty if run_bias is None else run_bias, True, bits, group)
            elif run.packed is not None:
                cols.copy_(run.packed(x2))
            else:
                b = None if run_bias is None else run_bias.to(x2.dtype)
                cols.copy_(F.linear(x2, run.weight.to(x2.dtype), b))
        out = out.reshape(*shape[:-1], layer.out_features)
        return out if logits else out.to(x.dtype)


def stored_format(blocks: torch.Tensor, ggml_type: int) -> int:
    """The format of blocks loaded as `ggml_type`: a panel format once they were repacked.
    NOTE: recorded on the bytes' storage, which every tensor over them shares (a tied LM head
    and token embedding are two tensors over one storage)."""
    return getattr(blocks.untyped_storage(), "panel_format", ggml_type)


def _pack_panels(raw: torch.Tensor, ggml_type: int) -> int:
    """Repacks raw's blocks in place into the panel layout where its type has one; returns
    the format the kernels now take (bytes shared with a tied embedding are packed once)."""
    current = stored_format(raw, ggml_type)
    if current >= PANEL_FORMAT or ggml_type not in PANEL_TYPES:
        return current
    storage = raw.untyped_storage()
    if storage.nbytes() != raw.nbytes:
        raise ValueError("GGUF blocks to repack must own their storage")
    storage.panel_format = cpu_ops().gguf_pack_panels_(raw, ggml_type)
    return storage.panel_format


def _dequantize(raw: torch.Tensor, ggml_type: int, in_features: int) -> torch.Tensor:
    """Raw blocks as float32 with the gguf package (where the kernels could not be built)."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    values = dequantize(raw.numpy(), GGMLQuantizationType(ggml_type))
    return torch.from_numpy(values.reshape(raw.shape[0], in_features).copy())


# The activations' quantization (bits, inputs per scale) on the GGUF kernels' layers:
# PAGEDLLM_GGUF_ACTIVATIONS=BITS/GROUP (16/32, the default; 8/32 or 8/16) selects it. The LM
# head keeps 16 bits per 32: its input is the most sensitive (an fp32 emulation on 12,288
# tokens of the shipped text against the file dequantized: 8/32 everywhere 96.24% top-1, 8/16
# 97.06%, 8/16 with the head at 16 bits 97.52%; the engine on 24,576 tokens: 8/16 layers
# 97.68%, +0.09% perplexity, against 16/32's 99.99%, +0.00%). Quiet, side by side, the fixed
# workload ran 0.84x dense bf16 with 16/32 and 1.01-1.13x with 8/16 (docs/benchmarks.md), but
# 8/16's greedy answer to the quickstart's question departs from the file's at the first token
# (16/32 and the dequantized file answer alike), so the default keeps 16 bits.
# NOTE: that first token is a near tie ("The" against "L": 0.08 nats apart in the file
# dequantized to fp32, 0.16 in bf16), and no single projection or layer moves it: with 16 bits
# on one kind of projection (q/k/v, o, gate/up or down) or on the first and last two layers and
# 8/16 elsewhere, the answer flips by chance with the dtype, and top-1 stays at 97.4-97.8%
# against 8/16's 97.1% (an emulation on 4,096 tokens; benchmarks/answers.py checks the answers).
# 16-bit activations run two VPDPBUSD per 64 products, as many instructions as dense bf16's
# VDPBF16PS plus the blocks' scaling, so only 8-bit ones can pass dense bf16 on batches.
# NOTE: one 16-bit scale per row (or per 256 inputs) instead of per 32 was built and measured
# (branch gguf-row-scale: per block float(P) times the weight's scale alone, the row's scale
# once at the end, one multiply per block less): the layers ran 4-6% faster per call at 64-256
# rows (one thread's CPU time, loaded machine), the Q8_0 LM head 4-7% slower, and SmolLM2's
# outlier channels coarsen the step: top-1 99.95% (per 256: 99.93%) against 16/32's 99.99%
# on 8,192 tokens, the largest logprob change 0.016 (0.0064) against 0.0027, bf16 answers
# 14/20 against 17/20 (fp32 20/20 against 19/20, "Paris" in both), so 16/32 stays.
ACTIVATIONS_ENV = "PAGEDLLM_GGUF_ACTIVATIONS"
DEFAULT_ACTIVATIONS = (16, 32)
HEAD_ACTIVATIONS = (16, 32)
ACTIVATION_SCHEMES = ((16, 32), (8, 32), (8, 16))


def activation_scheme(value: str | None = None) -> tuple[int, int]:
    """BITS/GROUP (default: the environment's PAGEDLLM_GGUF_ACTIVATIONS, else
    DEFAULT_ACTIVATIONS) as a pair; a ValueError names the schemes for anything else."""
    value = os.environ.get(ACTIVATIONS_ENV) if value is None else value
    if not value:
        return DEFAULT_ACTIVATIONS
    try:
        bits, group = (int(v) for v in value.split("/"))
    except ValueError:
        bits, group = 0, 0
    if (bits, group) not in ACTIVATION_SCHEMES:
        raise ValueError(f"{ACTIVATIONS_ENV} must be one of "
                         f"{', '.join(f'{b}/{g}' for b, g in ACTIVATION_SCHEMES)}, got {value!r}")
    return bits, group


class GGUFConfig(QuantizationConfig):
    """A GGUF file's own types: every linear layer on the GGUF method. The kernels' activations
    (activation_scheme) are the process's setting, which the decoder stack's calls take too."""

    def __init__(self, activations: tuple[int, int] | None = None) -> None:
        super().__init__()
        self.activations = activation_scheme() if activations is None else activations
        ops = cpu_ops()
        if ops is not None:
            ops.set_gguf_activations(*self.activations)

    def get_name(self) -> str:
        return "gguf"

    def get_linear_method(self, layer: nn.Module, prefix: str) -> LinearMethodBase | None:
        return GGUFLinearMethod()


class GGUFEmbedding(KeepsParamAttrs):
    """A token embedding kept as a GGUF tensor's blocks: a lookup dequantizes only the rows it
    reads (the same values as the gguf package's dequantization, in the model's dtype)."""

    def __init__(self, num_embeddings: int, embedding_dim: int) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        weight = nn.Parameter(torch.empty(1, dtype=torch.uint8), requires_grad=False)
        set_weight_attrs(weight, {"weight_loader": self._load})
        self.weight = weight
        self.register_buffer("gguf_dtype", torch.empty(0), persistent=False)
        self.blocks: torch.Tensor | None = None
        self.ggml_type: int | None = None

    def _load(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        ggml_type = getattr(loaded, "ggml_type", None)
        if ggml_type is None:
            raise ValueError("the GGUF embedding takes a quantized tensor")
        check_quantized_shape(loaded, ggml_type, self.num_embeddings, self.embedding_dim,
                              "token_embd")
        self.blocks, self.ggml_type = loaded, ggml_type

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        ids = input_ids.reshape(-1).long()
        out = torch.empty(ids.shape[0], self.embedding_dim, dtype=self.gguf_dtype.dtype)
        if ids.numel():
            # NOTE: a tied LM head may have repacked the blocks into panels.
            ggml_type = stored_format(self.blocks, self.ggml_type)
            cpu_ops().gguf_dequantize_rows(out, self.blocks, ggml_type, ids)
        return out.reshape(*input_ids.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        return f"num_embeddings={self.num_embeddings}, embedding_dim={self.embedding_dim}"
