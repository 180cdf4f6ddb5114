"""Architectures pagedllm implements, by the `architectures` name in a Hugging Face config."""

from __future__ import annotations

import importlib

from torch import nn

# Lazy: a model module is imported only when a checkpoint of its architecture is loaded.
_MODELS = {
    "LlamaForCausalLM": "pagedllm.models.llama:LlamaForCausalLM",
}


def supported_architectures() -> list[str]:
    return sorted(_MODELS)


def get_model_class(architectures: list[str] | None) -> type[nn.Module]:
    for arch in architectures or ["LlamaForCausalLM"]:
        if arch in _MODELS:
            module_name, class_name = _MODELS[arch].split(":")
            return getattr(importlib.import_module(module_name), class_name)
    raise ValueError(
        f"model architecture {architectures} is not supported; "
        f"supported: {', '.join(supported_architectures())}"
    )
