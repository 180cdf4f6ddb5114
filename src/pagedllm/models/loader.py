"""Loads a Hugging Face directory (config + safetensors) into the model class its config names.

The loader reads files; each model maps the checkpoint's names onto its parameters itself
(`load_weights`, see models/interface.py). Where the packed-weight cache holds the model's
packing (models/packed_cache.py), the linear layers' weights are checked for shape but not
read: the packing replaces them. A GGUF kept quantized is read from its own cache
(models/gguf_cache.py) where that holds it, and then not at all.
"""

from __future__ import annotations

import inspect
import logging
import os
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import safe_open
from torch import nn

from pagedllm.attention import AttentionBackend
from pagedllm.distributed import get_tp_group
from pagedllm.layers.quantization.base import QuantizationConfig
from pagedllm.layers.quantization.gguf import GGUFConfig, GGUFEmbedding
from pagedllm.layers.quantization.int8 import Int8Config
from pagedllm.layers.vocab_parallel_embedding import ParallelLMHead
from pagedllm.models import hf_fast, weight_prefetch
from pagedllm.models.checkpoint_tensor import CheckpointTensor
from pagedllm.models.interface import CausalLM
from pagedllm.models.registry import get_model_class
from pagedllm.ops import cpu_ops

if TYPE_CHECKING:
    from transformers import PretrainedConfig

logger = logging.getLogger(__name__)


def load_config(model_dir: Path) -> PretrainedConfig:
    """Reads the config; one whose architecture pagedllm lacks fails here, before any weights."""
    if not model_dir.is_dir() or not (model_dir / "config.json").is_file():
        raise ValueError(
            f"model path {str(model_dir)!r} is not a Hugging Face model directory "
            "(a folder with config.json and *.safetensors) nor a .gguf file"
        )
    try:
        config = hf_fast.load_config(model_dir)
    except Exception as exc:  # transformers raises many types for unreadable configs
        raise ValueError(f"cannot read the config of {str(model_dir)!r}: {exc}") from exc
    try:
        get_model_class(config.architectures)
    except ValueError as exc:
        raise ValueError(f"model {str(model_dir)!r}: {exc}") from None
    return config


def build_model(
    config: PretrainedConfig,
    model_dir: Path,
    backend: AttentionBackend,
    max_position: int,
    dtype: torch.dtype,
    device: torch.device,
    quantization: str = "none",
    model: str | os.PathLike | None = None,
) -> CausalLM:
    """Builds the model without random init, then fills every parameter from the checkpoint.

    Args:
        quantization: EngineConfig.quantization. "auto"/"gguf" on a .gguf `model` read its
            tensors in their quantized types (models/gguf_loader.py) instead of model_dir's
            dequantized safetensors; "int8" quantizes the linear layers at load.
        model: EngineConfig.model, the source model_dir was made from (None: the shipped GGUF).
    """
    model_cls = get_model_class(config.architectures)
    gguf_path = gguf_source(model)
    quant_config = _quant_config(quantization, gguf_path, model_cls, device)
    with torch.device("meta"):
        if quant_config is None:
            causal_lm = model_cls(config, backend, max_position)
        else:
            causal_lm = model_cls(config, backend, max_position, quant_config=quant_config)
        tied_gguf_head = (isinstance(quant_config, GGUFConfig) and causal_lm.lm_head is None
                          and get_tp_group().world_size == 1)
        if tied_gguf_head:
            # NOTE: a tied GGUF head runs on the embedding's blocks as stored (the file has one
            # token_embd tensor; gguf_weights hands its blocks over as lm_head.weight too),
            # while the lookups read the dequantized table.
            causal_lm.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size,
                                               quant_config=quant_config, prefix="lm_head")
        embeds_blocks = isinstance(quant_config, GGUFConfig) and _gguf_embedding(causal_lm)
    _materialize(causal_lm, torch.device(device))
    causal_lm.init_buffers()
    if isinstance(quant_config, GGUFConfig):
        from pagedllm.models import gguf_loader
        from pagedllm.models.gguf_cache import GGUFWeightCache

        cache = GGUFWeightCache.for_model(causal_lm, gguf_path, dtype)
        if cache is not None and cache.map_into(causal_lm):
            gguf_loader.forget_index()  # the architecture check's; no weight pass follows
        else:
            float_names = () if embeds_blocks else ("token_embd.weight",)
            weights = gguf_loader.gguf_weights(gguf_path, config, float_names, tied_gguf_head)
            _load_checked(causal_lm, weights, str(gguf_path))
    else:
        packed = _packed_from_cache(causal_lm, dtype) if quant_config is None else []
        load_weights(causal_lm, model_dir)
        for layer in packed:
            layer.weight = nn.Parameter(torch.empty(0, dtype=dtype), requires_grad=False)
    weight_prefetch.discard()  # a file read during the start that was not this model's
    causal_lm = causal_lm.to(dtype).eval()
    if isinstance(quant_config, Int8Config):  # smoothing, on the weights in `dtype`
        quant_config.calibrate(causal_lm, model_dir)
    return causal_lm


def _materialize(model: nn.Module, device: torch.device) -> None:
    """Module.to_empty(device) for a model built on the meta device, without its
    torch.empty_like, which on meta tensors runs torch's Python reference and imports sympy
    (half a second of a start). A tensor two modules share stays shared."""
    made: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id -> (meta, its replacement)
    for module in model.modules():
        for table in (module._parameters, module._buffers):
            for name, t in table.items():
                if t is None or t.device.type != "meta":
                    continue
                if id(t) not in made:
                    empty = torch.empty(t.shape, dtype=t.dtype, device=device)
                    if isinstance(t, nn.Parameter):
                        empty = nn.Parameter(empty, requires_grad=t.requires_grad)
                        empty.__dict__.update(t.__dict__)  # weight_loader, output_dim, ...
                    made[id(t)] = (t, empty)
                table[name] = made[id(t)][1]


def _packed_from_cache(model: CausalLM, dtype: torch.dtype) -> list[nn.Module]:
    """Where the packed-weight cache holds this CPU model's packing: gives it to the layers
    (models/packed_cache.py: map_into) and swaps each one's weight for a meta stand-in whose
    weight_loader checks the checkpoint tensor's shape as the layer's does, reading nothing;
    returns those layers."""
    from pagedllm.models.packed_cache import PackedWeightCache

    cache = PackedWeightCache.for_model(model, dtype)
    if cache is None:
        return []
    weights = {module: module.weight for module in model.modules()
               if isinstance(getattr(module, "weight", None), nn.Parameter)}
    layers = cache.map_into(model) or []
    for layer in layers:
        weight = weights[layer]
        stand_in = nn.Parameter(torch.empty(weight.shape, dtype=weight.dtype, device="meta"),
                                requires_grad=False)
        stand_in.__dict__.update(weight.__dict__)  # output_dim, input_dim, ...
        stand_in.weight_loader = _shape_checked(weight.weight_loader)
        layer.weight = stand_in
    return layers


def _shape_checked(weight_loader):
    """A weight_loader that runs `weight_loader` on a meta stand-in of the checkpoint tensor:
    its shape checks, no read."""
    def load(param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        weight_loader(param, torch.empty(loaded.shape, dtype=loaded.dtype, device="meta"),
                      shard_id)
    return load


def _gguf_embedding(model: CausalLM) -> bool:
    """Puts a GGUFEmbedding where the model's token embedding is (one rank, the ops built):
    lookups then dequantize the rows they read. False where it stays a float table."""
    embedding = model.get_input_embeddings()
    if get_tp_group().world_size != 1 or cpu_ops() is None:
        return False
    for name, module in model.named_modules():
        if module is embedding:
            parent_name, _, attr = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, attr, GGUFEmbedding(embedding.num_embeddings,
                                                embedding.embedding_dim))
            return True
    return False


def gguf_source(model: str | os.PathLike | None) -> Path | None:
    """The .gguf file a model setting names (None: the shipped one), else None."""
    if model is None:
        from pagedllm.models.default_model import default_gguf_path

        return default_gguf_path()
    path = Path(model).expanduser()
    return path if path.suffix == ".gguf" else None


def _quant_config(quantization: str, gguf_path: Path | None, model_cls: type,
                  device: torch.device) -> QuantizationConfig | None:
    if quantization == "none" or (quantization == "auto" and gguf_path is None):
        return None
    if quantization == "gguf" and gguf_path is None:
        raise ValueError("quantization='gguf' needs a .gguf model; for a Hugging Face "
                         "directory use one of auto, none, int8")
    if quantization not in ("auto", "gguf", "int8"):
        raise ValueError(f"quantization must be one of auto, none, int8, gguf, got "
                         f"{quantization!r}")
    on_cpu = torch.device(device).type == "cpu"
    has_quantized_layers = "quant_config" in inspect.signature(model_cls).parameters
    if quantization == "auto" and not (on_cpu and has_quantized_layers):
        return None  # auto (the default): a GGUF the quantized kernels can't run, dequantized
    if not on_cpu:
        raise ValueError(f"quantization={quantization!r} runs on the CPU kernels; on "
                         f"{device} use quantization='none'")
    if not has_quantized_layers:
        raise ValueError(f"{model_cls.__name__} has no quantized layers yet; use "
                         f"quantization='none'")
    if quantization == "int8":
        return Int8Config()
    from pagedllm.models import gguf_loader

    arch = gguf_loader.gguf_architecture(gguf_path)
    if arch not in gguf_loader.SUPPORTED_ARCHITECTURES:
        if quantization == "gguf":
            raise ValueError(f"{gguf_path.name}: quantization='gguf' supports the "
                             f"{', '.join(gguf_loader.SUPPORTED_ARCHITECTURES)} architecture, "
                             f"not {arch!r};"
                             f" use quantization='none'")
        return None  # auto: dequantized, as before
    split = gguf_loader.rank_split_error(gguf_path, get_tp_group().world_size)
    if split is not None:
        if quantization == "gguf":
            raise ValueError(f"{split}; use fewer ranks or quantization='none'")
        logger.info("%s: dequantized (quantization='auto'): %s", gguf_path.name, split)
        return None
    return GGUFConfig()


def _checkpoint_tensors(files: list[Path], reads: Counter, sizes: Counter
                        ) -> Iterator[tuple[str, CheckpointTensor]]:
    """Every tensor of the files, unread: each layer's weight_loader reads only its rank's
    part (models/checkpoint_tensor.py). `reads` counts the elements read and `sizes` the
    elements stored, by tensor name."""
    with ExitStack() as stack:
        for path in files:
            try:
                handle = stack.enter_context(safe_open(path, framework="pt"))
            except Exception as exc:  # noqa: BLE001 - safetensors' own error type, or OSError
                raise ValueError(f"weights file {str(path)!r} cannot be read (corrupt or "
                                 f"truncated?): {exc}") from None
            for name in handle.keys():  # noqa: SIM118 - safe_open is not iterable
                tensor = CheckpointTensor(handle, name, reads)
                sizes[name] = tensor.numel()
                yield name, tensor


def load_weights(model: CausalLM, model_dir: Path) -> None:
    """Fills the model from the directory's safetensors through its own name mapping, reading
    only this rank's part of each tensor; sets `model.checkpoint_reads` (elements read, by
    tensor name).

    Any mismatch between config and weights (a tensor with no place, a wrong shape, a
    parameter no tensor fills) is a ValueError naming the tensor and the directory.
    """
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ValueError(f"no *.safetensors weights in {str(model_dir)!r}")
    reads, sizes = Counter(), Counter()
    _load_checked(model, _checkpoint_tensors(files, reads, sizes), str(model_dir))
    model.checkpoint_reads = reads
    tp = get_tp_group()
    if tp.world_size > 1:
        logger.info("rank %d of %d read %.1f%% of the checkpoint's %d elements", tp.rank,
                    tp.world_size, 100 * sum(reads.values()) / max(sizes.total(), 1),
                    sizes.total())


def _load_checked(model: CausalLM, weights: Iterator[tuple[str, torch.Tensor]],
                  source: str) -> None:
    try:
        loaded = model.load_weights(weights)
    except ValueError as exc:
        raise ValueError(f"model {source!r}: {exc}") from None
    unfilled = sorted(set(dict(model.named_parameters())) - loaded)
    if unfilled:  # a family's own load_weights that skipped a parameter
        raise ValueError(f"model {source!r}: {type(model).__name__}.load_weights "
                         f"left parameters unfilled: {unfilled[:5]}")
