"""Qwen3 (`Qwen3ForCausalLM`): Llama with an RMSNorm over each head of q and k before rotary."""

from __future__ import annotations

import torch
from transformers import PretrainedConfig

from pagedllm.attention import AttentionBackend
from pagedllm.layers.norm import RMSNorm
from pagedllm.layers.quantization import QuantizationConfig
from pagedllm.layers.rotary import RotaryEmbedding
from pagedllm.models.llama import LlamaAttention
from pagedllm.models.mistral import MistralForCausalLM


class Qwen3Attention(LlamaAttention):
    """Llama's attention whose q and k heads are each RMS-normalised (q_norm, k_norm)."""

    def __init__(self, config: PretrainedConfig, rotary: RotaryEmbedding,
                 backend: AttentionBackend, quant_config: QuantizationConfig | None = None,
                 prefix: str = "") -> None:
        super().__init__(config, rotary, backend, quant_config, prefix)
        self.q_norm = RMSNorm(self.head_size, config.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_size, config.rms_norm_eps)

    def split_heads(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q, k, v = super().split_heads(q, k, v)
        # Per head: [num_tokens * heads, head_size] rows through the norm.
        q = self.q_norm(q.reshape(-1, self.head_size)).view(q.shape)
        k = self.k_norm(k.reshape(-1, self.head_size)).view(k.shape)
        return q, k, v

    def head_norms(self) -> tuple[RMSNorm, RMSNorm]:
        return self.q_norm, self.k_norm


class Qwen3ForCausalLM(MistralForCausalLM):
    """Qwen3 (dense); the checkpoint's names are Llama's plus q_norm/k_norm."""

    attention_cls = Qwen3Attention
