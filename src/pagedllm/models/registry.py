"""Architectures pagedllm implements, by the `architectures` name in a Hugging Face config."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PretrainedConfig

    from pagedllm.models.interface import CausalLM

# Lazy: a model module is imported only when a checkpoint of its architecture is loaded.
# Every class implements the `CausalLM` interface (models/interface.py).
_MODELS = {
    "LlamaForCausalLM": "pagedllm.models.llama:LlamaForCausalLM",
    "GPT2LMHeadModel": "pagedllm.models.gpt2:GPT2LMHeadModel",
    "OPTForCausalLM": "pagedllm.models.opt:OPTForCausalLM",
    "Qwen2ForCausalLM": "pagedllm.models.qwen2:Qwen2ForCausalLM",
    "MistralForCausalLM": "pagedllm.models.mistral:MistralForCausalLM",
    "Qwen3ForCausalLM": "pagedllm.models.qwen3:Qwen3ForCausalLM",
    "Phi3ForCausalLM": "pagedllm.models.phi3:Phi3ForCausalLM",
    "Gemma2ForCausalLM": "pagedllm.models.gemma2:Gemma2ForCausalLM",
    "Gemma3ForCausalLM": "pagedllm.models.gemma3:Gemma3ForCausalLM",
}


def supported_architectures() -> list[str]:
    """The architectures pagedllm serves, in the order they were added."""
    return list(_MODELS)


def get_model_class(architectures: list[str] | None) -> type[CausalLM]:
    """The class of the first supported name in a config's `architectures`.

    A config without `architectures` is refused like an unknown one: guessing a class would
    load weights into a model they were not made for.
    """
    supported = ", ".join(supported_architectures())
    if not architectures:
        raise ValueError(
            'the config names no architecture ("architectures" is missing or empty), so '
            f"pagedllm cannot pick a model class: set it to one of: {supported}"
        )
    for arch in architectures:
        if arch in _MODELS:
            module_name, class_name = _MODELS[arch].split(":")
            return getattr(importlib.import_module(module_name), class_name)
    raise ValueError(
        f"model architecture {', '.join(map(str, architectures))} is not supported; "
        f"supported: {supported}"
    )


def layer_sliding_window(config: PretrainedConfig, layer_idx: int) -> int | None:
    """The sliding window of layer `layer_idx` (None: it attends to the whole context).

    transformers' rule: with `layer_types`, only "sliding_attention" layers take
    `sliding_window`; without them (Mistral, Phi-3), every layer does.
    """
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if window is None or (layer_types is not None
                          and layer_types[layer_idx] != "sliding_attention"):
        return None
    return int(window)


def kv_cache_sliding_window(config: PretrainedConfig) -> int | None:
    """The most positions any layer's queries see, where every layer has a window (the block
    manager frees blocks out of it); None where some layer attends to the whole context."""
    windows = [layer_sliding_window(config, i) for i in range(config.num_hidden_layers)]
    if not windows or any(w is None for w in windows):
        return None
    return max(windows)
