"""Qwen2 (`Qwen2ForCausalLM`): Llama with biases on q, k and v (none on o), and sliding-window
layers where the config enables them (`use_sliding_window`, `max_window_layers`)."""

from __future__ import annotations

import copy

from transformers import PretrainedConfig

from pagedllm.attention import AttentionBackend
from pagedllm.layers.linear import RowParallelLinear
from pagedllm.layers.quantization import QuantizationConfig
from pagedllm.layers.rotary import RotaryEmbedding
from pagedllm.models.llama import LlamaAttention
from pagedllm.models.mistral import MistralForCausalLM


class Qwen2Attention(LlamaAttention):
    """Llama's attention with biased q/k/v projections and an unbiased output projection."""

    def __init__(self, config: PretrainedConfig, rotary: RotaryEmbedding,
                 backend: AttentionBackend, quant_config: QuantizationConfig | None = None,
                 prefix: str = "") -> None:
        biased = copy.copy(config)
        biased.attention_bias = True
        super().__init__(biased, rotary, backend, quant_config, prefix)
        self.o_proj = RowParallelLinear(config.num_attention_heads * self.head_size,
                                        config.hidden_size, bias=False,
                                        quant_config=quant_config, prefix=f"{prefix}.o_proj")


class Qwen2ForCausalLM(MistralForCausalLM):
    """Qwen2 / Qwen2.5; the checkpoint's names are Llama's."""

    attention_cls = Qwen2Attention
