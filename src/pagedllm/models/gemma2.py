"""Gemma 2 (`Gemma2ForCausalLM`) over a flattened batch with a paged KV cache.

Embeddings scaled by sqrt(hidden_size) (rounded to the embedding dtype first, as transformers
does), (1 + weight) RMSNorms before and after both attention and MLP, GELU-tanh gating, scores
scaled by query_pre_attn_scalar**-0.5 and soft-capped (attn_logit_softcapping), sliding-window
layers interleaved with global ones (`layer_types`), and soft-capped final logits. Module path
on the fused attention kernel (which takes the windows and soft caps) and packed linear layers.
Also the base of Gemma 3 (models/gemma3.py).
"""

from __future__ import annotations

import copy
from typing import ClassVar

import torch
from torch import nn
from transformers import PretrainedConfig

from pagedllm.attention import AttentionBackend, AttentionMetadata
from pagedllm.layers.activation import gelu_and_mul
from pagedllm.layers.linear import (
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
)
from pagedllm.layers.norm import GemmaRMSNorm
from pagedllm.layers.quantization import QuantizationConfig
from pagedllm.layers.rotary import RotaryEmbedding
from pagedllm.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding
from pagedllm.models.interface import CausalLMBase, WeightMapping
from pagedllm.models.registry import layer_sliding_window

_GELU_TANH = ("gelu_pytorch_tanh", "gelu_new", "gelu_fast")


def head_size_of(config: PretrainedConfig) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


class GemmaAttention(nn.Module):
    """Self-attention over this rank's heads: q/k/v column-parallel by heads, o row-parallel."""

    # Whether attn_logit_softcapping caps the scores (Gemma 2; transformers' Gemma 3 ignores it).
    soft_caps_scores: ClassVar[bool] = True

    def __init__(self, config: PretrainedConfig, layer_idx: int, rotary: RotaryEmbedding,
                 backend: AttentionBackend, quant_config: QuantizationConfig | None = None,
                 prefix: str = "") -> None:
        super().__init__()
        self.head_size = head_size_of(config)
        bias = getattr(config, "attention_bias", False)
        # Fused [q | k | v] projection; load_weights packs q_proj, k_proj and v_proj into it.
        self.qkv_proj = QKVParallelLinear(config.hidden_size, self.head_size,
                                          config.num_attention_heads, config.num_key_value_heads,
                                          bias=bias, quant_config=quant_config,
                                          prefix=f"{prefix}.qkv_proj")
        # This rank's heads.
        self.num_heads, self.num_kv_heads = self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads
        self.q_size, self.kv_size = self.qkv_proj.q_size, self.qkv_proj.kv_size
        self.o_proj = RowParallelLinear(config.num_attention_heads * self.head_size,
                                        config.hidden_size, bias=bias, quant_config=quant_config,
                                        prefix=f"{prefix}.o_proj")
        self.rotary = rotary
        self.backend = backend.for_layer(
            scale=config.query_pre_attn_scalar**-0.5,
            sliding_window=layer_sliding_window(config, layer_idx),
            logits_soft_cap=(getattr(config, "attn_logit_softcapping", None)
                             if self.soft_caps_scores else None),
        )

    def qk_norm(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q: [num_tokens, heads, head], k: [num_tokens, kv_heads, head]; none in Gemma 2."""
        return q, k

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor, kv_cache: torch.Tensor,
                metadata: AttentionMetadata) -> torch.Tensor:
        # hidden: [num_tokens, hidden_size]
        num_tokens = hidden.shape[0]
        q, k, v = self.qkv_proj(hidden).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.reshape(num_tokens, self.num_heads, self.head_size)
        k = k.reshape(num_tokens, self.num_kv_heads, self.head_size)
        v = v.view(num_tokens, self.num_kv_heads, self.head_size)
        q, k = self.rotary(positions, *self.qk_norm(q, k))
        out = self.backend.forward(q, k, v, kv_cache, metadata)  # [num_tokens, heads, head]
        return self.o_proj(out.reshape(num_tokens, self.q_size))


class GemmaMLP(nn.Module):
    """GeGLU: [gate | up] column-parallel (each rank gates its own units), down row-parallel."""

    def __init__(self, config: PretrainedConfig, quant_config: QuantizationConfig | None = None,
                 prefix: str = "") -> None:
        super().__init__()
        act = getattr(config, "hidden_activation", None) or config.hidden_act
        if act not in _GELU_TANH:
            raise ValueError(f"hidden_activation {act!r} is not supported for Gemma; "
                             f"supported: {', '.join(_GELU_TANH)}")
        # Fused [gate | up] projection; load_weights packs gate_proj and up_proj into it.
        self.gate_up_proj = MergedColumnParallelLinear(
            config.hidden_size, [config.intermediate_size] * 2, bias=False,
            quant_config=quant_config, prefix=f"{prefix}.gate_up_proj")
        self.down_proj = RowParallelLinear(config.intermediate_size, config.hidden_size,
                                           bias=False, quant_config=quant_config,
                                           prefix=f"{prefix}.down_proj")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(gelu_and_mul(self.gate_up_proj(x)))


class GemmaDecoderLayer(nn.Module):
    attention_cls: ClassVar[type[GemmaAttention]] = GemmaAttention

    def __init__(self, config: PretrainedConfig, layer_idx: int, rotary: RotaryEmbedding,
                 backend: AttentionBackend, quant_config: QuantizationConfig | None = None,
                 prefix: str = "") -> None:
        super().__init__()
        size, eps = config.hidden_size, config.rms_norm_eps
        self.input_layernorm = GemmaRMSNorm(size, eps)
        self.self_attn = self.attention_cls(config, layer_idx, rotary, backend, quant_config,
                                            prefix=f"{prefix}.self_attn")
        self.post_attention_layernorm = GemmaRMSNorm(size, eps)
        self.pre_feedforward_layernorm = GemmaRMSNorm(size, eps)
        self.mlp = GemmaMLP(config, quant_config, prefix=f"{prefix}.mlp")
        self.post_feedforward_layernorm = GemmaRMSNorm(size, eps)

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor, kv_cache: torch.Tensor,
                metadata: AttentionMetadata) -> torch.Tensor:
        attn = self.self_attn(positions, self.input_layernorm(hidden), kv_cache, metadata)
        hidden = hidden + self.post_attention_layernorm(attn)
        mlp = self.mlp(self.pre_feedforward_layernorm(hidden))
        return hidden + self.post_feedforward_layernorm(mlp)


class Gemma2ForCausalLM(CausalLMBase):
    """Gemma 2; parameters named as the checkpoint's without `model.`, q/k/v and gate/up
    packed."""

    weight_mapping = WeightMapping(
        prefixes={"model.": ""},
        packed_modules={
            "q_proj": ("qkv_proj", 0),
            "k_proj": ("qkv_proj", 1),
            "v_proj": ("qkv_proj", 2),
            "gate_proj": ("gate_up_proj", 0),
            "up_proj": ("gate_up_proj", 1),
        },
    )
    profiled_modules: ClassVar[dict[str, type[nn.Module]]] = {
        "attention block": GemmaAttention, "mlp": GemmaMLP}
    layer_cls: ClassVar[type[GemmaDecoderLayer]] = GemmaDecoderLayer

    def __init__(self, config: PretrainedConfig, backend: AttentionBackend, max_position: int,
                 quant_config: QuantizationConfig | None = None) -> None:
        super().__init__(config)
        if getattr(config, "use_bidirectional_attention", False):
            raise ValueError("use_bidirectional_attention is not supported: pagedllm's "
                             "attention is causal")
        self.rotaries = nn.ModuleDict(self.build_rotaries(config, max_position))
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size,
                                                   prefix="embed_tokens")
        self.layers = nn.ModuleList(
            self.layer_cls(config, i, self.rotaries[self.rotary_key(config, i)], backend,
                           quant_config, prefix=f"layers.{i}")
            for i in range(config.num_hidden_layers)
        )
        self.norm = GemmaRMSNorm(config.hidden_size, config.rms_norm_eps)
        if not getattr(config, "tie_word_embeddings", True):
            self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size,
                                          quant_config=quant_config, prefix="lm_head")
        self.final_logit_softcapping = getattr(config, "final_logit_softcapping", None)

    @staticmethod
    def build_rotaries(config: PretrainedConfig, max_position: int) -> dict[str, RotaryEmbedding]:
        """One RoPE table for every layer (Gemma 3 has one per layer type)."""
        return {"all": RotaryEmbedding(config, head_size_of(config), max_position)}

    @staticmethod
    def rotary_key(config: PretrainedConfig, layer_idx: int) -> str:
        return "all"

    def get_input_embeddings(self) -> VocabParallelEmbedding:
        return self.embed_tokens

    def init_buffers(self) -> None:
        for rotary in self.rotaries.values():
            rotary.init_buffers()

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                kv_caches: list[torch.Tensor], metadata: AttentionMetadata) -> torch.Tensor:
        # input_ids, positions: [num_tokens] -> hidden: [num_tokens, hidden_size]
        hidden = self.embed_tokens(input_ids)
        # NOTE: the scale is rounded to the embedding dtype first, as transformers does.
        hidden = hidden * torch.tensor(self.config.hidden_size**0.5, dtype=hidden.dtype)
        for layer, kv_cache in zip(self.layers, kv_caches):
            hidden = layer(positions, hidden, kv_cache, metadata)
        return self.norm(hidden)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        logits = super().compute_logits(hidden)  # None on the ranks that do not sample
        cap = self.final_logit_softcapping
        if cap is not None and logits is not None:  # cap * tanh(logits / cap)
            logits = torch.tanh(logits / cap) * cap
        return logits


def rope_config(config: PretrainedConfig, rope_parameters: dict) -> PretrainedConfig:
    """A shallow copy of `config` whose RoPE is `rope_parameters` (one layer type's)."""
    view = copy.copy(config)
    view.rope_parameters = dict(rope_parameters)
    return view
