"""Loads a Hugging Face directory (config + safetensors) into the model class its config names.

The loader reads files; each model maps the checkpoint's names onto its parameters itself
(`load_weights`, see models/interface.py).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import AutoConfig, PretrainedConfig

from pagedllm.attention import AttentionBackend
from pagedllm.models.interface import CausalLM
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
) -> CausalLM:
    """Builds the model without random init, then fills every parameter from the checkpoint."""
    model_cls = get_model_class(config.architectures)
    with torch.device("meta"):
        model = model_cls(config, backend, max_position)
    model.to_empty(device=device)
    model.init_buffers()
    load_weights(model, model_dir)
    return model.to(dtype).eval()


def _checkpoint_tensors(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    for path in files:
        try:
            handle = safe_open(path, framework="pt")
        except Exception as exc:  # noqa: BLE001 - safetensors' own error type, or an OSError
            raise ValueError(f"weights file {str(path)!r} cannot be read (corrupt or "
                             f"truncated?): {exc}") from None
        with handle as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


def load_weights(model: CausalLM, model_dir: Path) -> None:
    """Fills the model from the directory's safetensors through its own name mapping.

    Any mismatch between config and weights (a tensor with no place, a wrong shape, a
    parameter no tensor fills) is a ValueError naming the tensor and the directory.
    """
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ValueError(f"no *.safetensors weights in {str(model_dir)!r}")
    weights = _checkpoint_tensors(files)
    try:
        loaded = model.load_weights(weights)
    except ValueError as exc:
        raise ValueError(f"model {str(model_dir)!r}: {exc}") from None
    unfilled = sorted(set(dict(model.named_parameters())) - loaded)
    if unfilled:  # a family's own load_weights that skipped a parameter
        raise ValueError(f"model {str(model_dir)!r}: {type(model).__name__}.load_weights "
                         f"left parameters unfilled: {unfilled[:5]}")
