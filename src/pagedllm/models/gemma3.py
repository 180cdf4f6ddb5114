"""Gemma 3, text only (`Gemma3ForCausalLM` with a `Gemma3TextConfig`): Gemma 2's layers without
score soft-capping, plus an RMSNorm over each head of q and k before
rotary, and a RoPE base of their own for the sliding-window layers (`rope_local_base_freq`,
transformers' rope_parameters["sliding_attention"])."""

from __future__ import annotations

import torch
from transformers import PretrainedConfig

from pagedllm.attention import AttentionBackend
from pagedllm.layers.norm import GemmaRMSNorm
from pagedllm.layers.quantization import QuantizationConfig
from pagedllm.layers.rotary import RotaryEmbedding
from pagedllm.models.gemma2 import (
    Gemma2ForCausalLM,
    GemmaAttention,
    GemmaDecoderLayer,
    head_size_of,
    rope_config,
)


class Gemma3Attention(GemmaAttention):
    # NOTE: Gemma3TextConfig has attn_logit_softcapping, but transformers' Gemma 3 attention
    # never applies it (Gemma 3 checkpoints set none): nor does this one.
    soft_caps_scores = False

    def __init__(self, config: PretrainedConfig, layer_idx: int, rotary: RotaryEmbedding,
                 backend: AttentionBackend, quant_config: QuantizationConfig | None = None,
                 prefix: str = "") -> None:
        super().__init__(config, layer_idx, rotary, backend, quant_config, prefix)
        self.q_norm = GemmaRMSNorm(self.head_size, config.rms_norm_eps)
        self.k_norm = GemmaRMSNorm(self.head_size, config.rms_norm_eps)

    def qk_norm(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.q_norm(q), self.k_norm(k)


class Gemma3DecoderLayer(GemmaDecoderLayer):
    attention_cls = Gemma3Attention


class Gemma3ForCausalLM(Gemma2ForCausalLM):
    """Gemma 3 text (270M, 1B, and the text towers of the larger ones)."""

    layer_cls = Gemma3DecoderLayer

    @staticmethod
    def build_rotaries(config: PretrainedConfig, max_position: int) -> dict[str, RotaryEmbedding]:
        params = config.rope_parameters
        head_size = head_size_of(config)
        return {layer_type: RotaryEmbedding(rope_config(config, params[layer_type]), head_size,
                                            max_position)
                for layer_type in sorted(set(config.layer_types))}

    @staticmethod
    def rotary_key(config: PretrainedConfig, layer_idx: int) -> str:
        return config.layer_types[layer_idx]
