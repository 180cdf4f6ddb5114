"""Loads a Llama-family Hugging Face directory (config + safetensors) into our model classes."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from transformers import AutoConfig, PretrainedConfig

from pagedllm.attention import AttentionBackend
from pagedllm.models.registry import get_model_class

logger = logging.getLogger(__name__)


def load_config(model_dir: Path) -> PretrainedConfig:
    """Reads the config; one whose architecture pagedllm lacks fails here, before any weights."""
    if not model_dir.is_dir() or not (model_dir / "config.json").is_file():
        raise ValueError(
            f"model path {str(model_dir)!r} is not a Hugging Face model directory "
            "(a folder with config.json and *.safetensors) nor a .gguf file"
        )
    try:
        config = AutoConfig.from_pretrained(model_dir, local_files_only=True)
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
) -> nn.Module:
    """Builds the model without random init, then fills every parameter from the checkpoint."""
    model_cls = get_model_class(config.architectures)
    with torch.device("meta"):
        model = model_cls(config, backend, max_position)
    model.to_empty(device=device)
    for module in model.modules():
        if hasattr(module, "init_buffers"):
            module.init_buffers()
    load_weights(model, model_dir)
    return model.to(dtype).eval()


def _checkpoint_tensors(model_dir: Path):
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ValueError(f"no *.safetensors weights in {str(model_dir)!r}")
    for path in files:
        try:
            handle = safe_open(path, framework="pt")
        except Exception as exc:  # noqa: BLE001 - safetensors' own error type, or an OSError
            raise ValueError(f"weights file {str(path)!r} cannot be read (corrupt or "
                             f"truncated?): {exc}") from None
        with handle as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


def load_weights(model: nn.Module, model_dir: Path) -> None:
    """Copies checkpoint tensors into the model, packing q/k/v and gate/up into fused weights.

    NOTE: checkpoint names are Hugging Face's (`model.layers.0.self_attn.q_proj.weight`); ours
    drop the `model.` prefix and fuse projections listed in the model's `packed_modules`.
    """
    params = dict(model.named_parameters())
    packed = getattr(model, "packed_modules", {})
    loaded: set[str] = set()
    for name, tensor in _checkpoint_tensors(model_dir):
        if name.endswith("rotary_emb.inv_freq"):
            continue
        if name == "lm_head.weight" and getattr(model, "lm_head", None) is None:
            continue  # tied embeddings: the head reuses embed_tokens
        name = name.removeprefix("model.")
        parts = name.split(".")
        shard = None
        for i, part in enumerate(parts):
            if part in packed:
                fused, shard = packed[part]
                parts[i] = fused
                break
        target = ".".join(parts)
        if target not in params:
            raise ValueError(f"checkpoint tensor {name!r} has no place in {type(model).__name__}")
        param = params[target]
        with torch.no_grad():
            if shard is None:
                _copy_checked(param.data, tensor, name)
            else:
                module = model.get_submodule(target.rsplit(".", 1)[0])
                sizes = module.shard_sizes
                offset = sum(sizes[:shard])
                _copy_checked(param.data.narrow(0, offset, sizes[shard]), tensor, name)
        loaded.add(f"{target}#{shard}")
    expected = set()
    for target, param in params.items():
        module_name = target.rsplit(".", 1)[0]
        module = model.get_submodule(module_name) if "." in target else model
        sizes = getattr(module, "shard_sizes", None)
        for shard in range(len(sizes)) if sizes else [None]:
            expected.add(f"{target}#{shard}")
    missing = sorted(expected - loaded)
    if missing:
        raise ValueError(f"checkpoint in {str(model_dir)!r} lacks weights: {missing[:5]}")


def _copy_checked(dst: torch.Tensor, src: torch.Tensor, name: str) -> None:
    if dst.shape != src.shape:
        raise ValueError(
            f"checkpoint tensor {name!r} has shape {tuple(src.shape)}, expected {tuple(dst.shape)}"
        )
    dst.copy_(src)
