"""The model interface: what the loader, worker and runner may call on a model.

Every architecture in the registry is a `CausalLM`. The loader builds it as
`cls(config, backend, max_position)` on the meta device, then fills it through `load_weights`;
the runner calls `forward` over a flattened batch and `compute_logits` on the rows it samples.
`CausalLMBase` gives the parts a family does not write itself: the checked weight loading
driven by its `weight_mapping`, the tied or untied LM head, packing for the CPU paths, and
profiling hooks.

NOTE: tensor parallelism and quantized linear methods plug in under this interface, not into
it: a layer that holds a shard, or stores its weight quantized, gives its parameters a
`weight_loader(param, tensor, shard)` (vLLM's contract) and `load_mapped_weights` hands it the
checkpoint tensor to narrow or quantize; the model's name mapping stays the same.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar, Protocol, runtime_checkable

import torch
from torch import nn

from pagedllm.layers.linear import LinearBase, PackedWeight, pack_linear_layers, try_pack
from pagedllm.layers.quantization.base import WeightShapeError
from pagedllm.layers.vocab_parallel_embedding import ParallelLMHead, gather_logits

if TYPE_CHECKING:
    from transformers import PretrainedConfig

    from pagedllm.attention import AttentionMetadata
    from pagedllm.profiler import StepProfiler

# allocate(shape, dtype) -> an empty tensor to move a packed weight into (the worker's huge pages).
Allocate = Callable[[Sequence[int], torch.dtype], torch.Tensor]


@runtime_checkable
class CausalLM(Protocol):
    """A decoder-only language model over a flattened batch with a paged KV cache.

    Constructed as cls(config, backend, max_position): `backend` is the attention backend the
    worker built for the config's heads; `max_position` bounds the positions it will see.
    """

    # Module types the step profiler times with forward hooks, by the name it reports.
    profiled_modules: ClassVar[dict[str, type[nn.Module]]]

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[torch.Tensor],
        metadata: AttentionMetadata,
    ) -> torch.Tensor:
        """input_ids, positions: [num_tokens] -> hidden states [num_tokens, hidden].

        `kv_caches` holds one tensor per layer; the backend writes the new keys and values
        at `metadata.slot_mapping` and attends through its block tables.
        """
        ...

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """hidden: [num_rows, hidden] (rows of forward's output) -> [num_rows, vocab] float32
        (on rank 0 under tensor parallelism; None on the other ranks, which do not sample)."""
        ...

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Fills every parameter from checkpoint (name, tensor) pairs; returns the names of the
        parameters filled. A tensor with no place, a wrong shape or a parameter left unfilled
        is a ValueError naming the tensor."""
        ...

    def init_buffers(self) -> None:
        """Fills the buffers that are not weights (rotary tables) once the model, built on the
        meta device, has real storage."""
        ...

    def pack_weights(self, allocate: Allocate | None = None) -> int:
        """Packs the projections for the CPU paths (CPU only, after loading); returns how many.
        With `allocate`, the packed tensors then move into memory from allocate(shape, dtype)."""
        ...

    def packed_weights(self) -> list[PackedWeight]:
        """Every packed weight of the model."""
        ...

    def attach_profiler(self, profiler: StepProfiler) -> None:
        """Lets parts the module hooks cannot see (a native stack) time themselves."""
        ...


@dataclass(frozen=True)
class WeightMapping:
    """How a family's checkpoint names become its parameter names.

    E.g. OPT's `model.decoder.layers.0.self_attn.k_proj.weight` -> prefix `model.decoder.`
    dropped -> module `k_proj` packed as shard 1 of `qkv_proj` ->
    `layers.0.self_attn.qkv_proj.weight` rows [q_size, q_size + kv_size).
    """

    # Leading part of a checkpoint name -> its replacement; the first that matches applies.
    prefixes: dict[str, str] = field(default_factory=dict)
    # Checkpoint module name -> (fused module name, shard index); the fused module's
    # `shard_sizes` give each shard's rows.
    packed_modules: dict[str, tuple[str, int]] = field(default_factory=dict)
    # Checkpoint module name -> ours, where a family groups modules differently (OPT's fc1 ->
    # mlp.fc1).
    renamed_modules: dict[str, str] = field(default_factory=dict)
    # Checkpoint names ending so are saved buffers, not weights (GPT-2's `attn.bias` mask).
    ignored_suffixes: tuple[str, ...] = ()
    # Weights stored [in, out] (GPT-2's Conv1D), by name suffix: transposed on load.
    transposed_suffixes: tuple[str, ...] = ()
    # Mapped names skipped when the model has no such parameter: a tied head reuses the
    # token embedding, whatever the checkpoint holds.
    tied_names: tuple[str, ...] = ("lm_head.weight",)

    def rename(self, name: str) -> str:
        for old, new in self.prefixes.items():
            if name.startswith(old):
                return new + name[len(old):]
        return name


def load_mapped_weights(
    model: nn.Module, weights: Iterable[tuple[str, torch.Tensor]], mapping: WeightMapping
) -> set[str]:
    """Copies checkpoint tensors into `model` by `mapping`; returns the parameter names filled.

    Raises:
        ValueError: naming a tensor with no place in the model, a tensor whose shape is not
            its parameter's, or the parameters (or packed shards) no tensor filled.
    """
    params = dict(model.named_parameters())
    cls_name = type(model).__name__
    loaded: set[tuple[str, int | None]] = set()
    for name, tensor in weights:
        if name.endswith(mapping.ignored_suffixes):
            continue
        target = mapping.rename(name)
        if target in mapping.tied_names and target not in params:
            continue
        if mapping.transposed_suffixes and target.endswith(mapping.transposed_suffixes):
            tensor = tensor.t()
        module_name, _, leaf = target.rpartition(".")
        head, _, last = module_name.rpartition(".")
        shard = None
        module = last
        if module in mapping.packed_modules:
            module, shard = mapping.packed_modules[module]
        module = mapping.renamed_modules.get(module, module)
        if module != last:
            module_name = f"{head}.{module}" if head else module
            target = f"{module_name}.{leaf}"
        param = params.get(target)
        if param is None:
            raise ValueError(f"checkpoint tensor {name!r} has no place in {cls_name} (no "
                             f"parameter {target!r}): does the config match the weights?")
        with torch.no_grad():
            weight_loader = getattr(param, "weight_loader", None)
            if weight_loader is not None:  # a layer that places its own shard (TP, quantized)
                try:
                    weight_loader(param, tensor, shard)
                except WeightShapeError as exc:
                    raise ValueError(f"checkpoint tensor {name!r} {exc}: does the config "
                                     f"match the weights?") from None
            elif shard is None:
                _copy_checked(param.data, tensor, name)
            else:
                sizes = model.get_submodule(module_name).shard_sizes
                dst = param.data.narrow(0, sum(sizes[:shard]), sizes[shard])
                _copy_checked(dst, tensor, name)
        loaded.add((target, shard))
    fused = {fused_name for fused_name, _ in mapping.packed_modules.values()}
    expected = {(name, shard) for name in params for shard in _shards(model, name, fused)}
    missing = sorted(expected - loaded, key=lambda item: (item[0], item[1] or 0))
    if missing:
        names = [_shard_name(name, shard, mapping) for name, shard in missing]
        more = f" and {len(names) - 5} more" if len(names) > 5 else ""
        raise ValueError(f"the checkpoint has no tensor for {cls_name} parameter(s) "
                         f"{', '.join(names[:5])}{more}: does the config match the weights?")
    return {name for name, _ in loaded}


def _shards(model: nn.Module, param_name: str, fused: set[str]) -> list[int | None]:
    """The loads a parameter expects: one per part of a module the mapping packs parts into
    (GPT-2's c_attn, fused in the checkpoint too, takes one)."""
    module_name = param_name.rpartition(".")[0]
    if module_name.rpartition(".")[2] not in fused:
        return [None]
    sizes = getattr(model.get_submodule(module_name), "shard_sizes", None)
    return list(range(len(sizes))) if sizes else [None]


def _shard_name(param_name: str, shard: int | None, mapping: WeightMapping) -> str:
    """A packed shard by its checkpoint module's name: (qkv_proj.weight, 1) -> k_proj.weight."""
    if shard is None:
        return param_name
    module_name, _, leaf = param_name.rpartition(".")
    head, _, fused = module_name.rpartition(".")
    for part, (fused_name, index) in mapping.packed_modules.items():
        if (fused_name, index) == (fused, shard):
            return f"{head}.{part}.{leaf}" if head else f"{part}.{leaf}"
    return f"{param_name}[shard {shard}]"


def _copy_checked(dst: torch.Tensor, src: torch.Tensor, name: str) -> None:
    if dst.shape != src.shape:
        raise ValueError(f"checkpoint tensor {name!r} has shape {tuple(src.shape)}, but the "
                         f"config makes it {tuple(dst.shape)}: does the config match the weights?")
    dst.copy_(src)


class CausalLMBase(nn.Module):
    """The shared parts of a `CausalLM`; a family writes forward, its layers and its mapping.

    A subclass sets `lm_head` (a `ParallelLMHead`, or None where the head is tied to the token
    embedding that `get_input_embeddings` returns) and `weight_mapping`.
    """

    weight_mapping: ClassVar[WeightMapping] = WeightMapping()
    profiled_modules: ClassVar[dict[str, type[nn.Module]]] = {}

    def __init__(self, config: PretrainedConfig) -> None:
        super().__init__()
        self.config = config
        self.lm_head: ParallelLMHead | None = None
        # A packed copy of the tied embedding (this rank's rows) for the LM head, set by
        # pack_weights().
        self.tied_lm_head: PackedWeight | None = None

    def get_input_embeddings(self) -> nn.Embedding:
        """The token embedding (also the LM head's weight where the head is tied)."""
        raise NotImplementedError

    def init_buffers(self) -> None:
        """Fills the buffers that are not weights (rotary tables) once the model, built on the
        meta device, has real storage; nothing by default."""

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        # hidden: [num_rows, hidden] -> logits: [num_rows, vocab_size] in float32 (rank 0)
        if self.lm_head is not None:
            return self.lm_head.compute_logits(hidden)
        if self.tied_lm_head is not None:  # fp32 written by the kernel, no conversion pass
            local = self.tied_lm_head(hidden, out_dtype=torch.float32)
        else:
            local = nn.functional.linear(hidden, self.get_input_embeddings().weight).float()
        return gather_logits(local, self.config.vocab_size)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        return load_mapped_weights(self, weights, self.weight_mapping)

    def pack_weights(self, allocate: Allocate | None = None) -> int:
        """Has every linear layer's method process its weights (the dense one packs them) and
        packs a tied LM head's copy of the embedding, which keeps its plain table for lookups.

        Dense CPU weights are read from the packed-weight cache where it holds this model's
        packing (models/packed_cache.py: into 2 MB pages of their own, not `allocate`'s), and
        written to it after packing otherwise."""
        from pagedllm.models.packed_cache import PackedWeightCache
        from pagedllm.startup_profile import mark

        mark("weights read")
        cache = PackedWeightCache.for_model(self)
        if cache is not None:
            count = cache.load(self)
            if count is not None:
                return count
        count = self._pack_weights(allocate)
        if cache is not None:
            cache.store(self)
        return count

    def _pack_weights(self, allocate: Allocate | None) -> int:
        count = pack_linear_layers(self)
        if self.lm_head is None:
            self.tied_lm_head = try_pack(self.get_input_embeddings().weight)
            count += self.tied_lm_head is not None
        if allocate is not None:
            for layer in self.modules():
                if isinstance(layer, LinearBase):
                    layer.linear_method.move_to(layer, allocate)
            if self.tied_lm_head is not None:
                self.tied_lm_head.move_to(allocate)
        return count

    def packed_weights(self) -> list[PackedWeight]:
        weights = [m.packed for m in self.modules() if isinstance(m, LinearBase) and m.packed]
        return weights + ([self.tied_lm_head] if self.tied_lm_head is not None else [])

    def attach_profiler(self, profiler: StepProfiler) -> None:
        """Nothing to attach: `profiled_modules`' hooks time every part of a module model."""
