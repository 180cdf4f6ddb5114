"""Mistral (`MistralForCausalLM`): Llama with sliding-window attention where the config sets one.

Also the base of the Llama variants (Qwen2, Qwen3, Phi-3): each layer gets its own attention
backend, windowed where the config's `layer_types` (or, without them, `sliding_window`) say so
(`registry.layer_sliding_window`).
They run the native decoder stack (models/llama_stack.py) as Llama does, each layer with its
own window.
"""

from __future__ import annotations

from transformers import PretrainedConfig

from pagedllm.attention import AttentionBackend
from pagedllm.layers.quantization import QuantizationConfig
from pagedllm.models.llama import LlamaForCausalLM
from pagedllm.models.registry import layer_sliding_window


class MistralForCausalLM(LlamaForCausalLM):
    """Llama whose layers may attend through a sliding window (`layer_sliding_window`)."""

    def __init__(self, config: PretrainedConfig, backend: AttentionBackend, max_position: int,
                 quant_config: QuantizationConfig | None = None) -> None:
        act = getattr(config, "hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"hidden_act {act!r} is not supported for "
                             f"{type(self).__name__} (its MLP gates with silu)")
        super().__init__(config, backend, max_position, quant_config)

    def layer_backend(self, config: PretrainedConfig, backend: AttentionBackend,
                      index: int) -> AttentionBackend:
        return backend.for_layer(sliding_window=layer_sliding_window(config, index))
