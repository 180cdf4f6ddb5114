"""Llama-family decoder (Llama, SmolLM, TinyLlama) over a flattened batch with a paged KV cache.

There is no batch dimension: the tokens of all scheduled requests, prefill chunks and decodes
alike, are concatenated into one [num_tokens] stream, and the attention backend uses the
metadata to keep requests apart.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import torch
from torch import nn

from pagedllm.attention import AttentionBackend, AttentionMetadata
from pagedllm.layers.linear import (
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
)
from pagedllm.layers.norm import RMSNorm
from pagedllm.layers.quantization import QuantizationConfig
from pagedllm.layers.rotary import RotaryEmbedding
from pagedllm.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding
from pagedllm.models.interface import Allocate, CausalLMBase, WeightMapping
from pagedllm.models.llama_stack import NativeDecoderStack
from pagedllm.profiler import StepProfiler

if TYPE_CHECKING:
    from transformers import LlamaConfig


class LlamaAttention(nn.Module):
    """Self-attention over this rank's heads: q/k/v column-parallel by heads, o row-parallel
    (its all-reduce sums the ranks' heads)."""

    def __init__(
        self,
        config: LlamaConfig,
        rotary: RotaryEmbedding,
        backend: AttentionBackend,
        quant_config: QuantizationConfig | None = None,
        prefix: str = "",
    ) -> None:
        super().__init__()
        total_num_heads = config.num_attention_heads
        total_num_kv_heads = getattr(config, "num_key_value_heads", None) or total_num_heads
        self.head_size = getattr(config, "head_dim", None) or config.hidden_size // total_num_heads
        bias = getattr(config, "attention_bias", False)
        # Fused [q | k | v] projection; the loader packs q_proj, k_proj and v_proj into it.
        self.qkv_proj = QKVParallelLinear(config.hidden_size, self.head_size, total_num_heads,
                                          total_num_kv_heads, bias=bias,
                                          quant_config=quant_config, prefix=f"{prefix}.qkv_proj")
        # This rank's heads.
        self.num_heads, self.num_kv_heads = self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads
        self.q_size, self.kv_size = self.qkv_proj.q_size, self.qkv_proj.kv_size
        self.o_proj = RowParallelLinear(total_num_heads * self.head_size, config.hidden_size,
                                        bias=bias, quant_config=quant_config,
                                        prefix=f"{prefix}.o_proj")
        self.rotary = rotary
        self.backend = backend

    def forward(
        self,
        positions: torch.Tensor,
        hidden: torch.Tensor,
        kv_cache: torch.Tensor,
        metadata: AttentionMetadata,
    ) -> torch.Tensor:
        # hidden: [num_tokens, hidden_size]
        num_tokens = hidden.shape[0]
        q, k, v = self.qkv_proj(hidden).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q, k, v = self.split_heads(q, k, v)
        q, k = self.rotary(positions, q, k)
        out = self.backend.forward(q, k, v, kv_cache, metadata)  # [num_tokens, heads, head]
        return self.o_proj(out.reshape(num_tokens, self.q_size))

    def split_heads(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """[num_tokens, heads * head_size] -> [num_tokens, heads, head_size], before rotary (a
        family that normalises each head, Qwen3, does it here)."""
        num_tokens = q.shape[0]
        return (q.view(num_tokens, self.num_heads, self.head_size),
                k.view(num_tokens, self.num_kv_heads, self.head_size),
                v.view(num_tokens, self.num_kv_heads, self.head_size))

    def head_norms(self) -> tuple[RMSNorm, RMSNorm] | None:
        """The RMSNorms split_heads applies to each q and k head (None: none), as the native
        stack is told them."""
        return None


class LlamaMLP(nn.Module):
    """SwiGLU: [gate | up] column-parallel (each rank gates its own units), down row-parallel."""

    def __init__(self, config: LlamaConfig, quant_config: QuantizationConfig | None = None,
                 prefix: str = "") -> None:
        super().__init__()
        bias = getattr(config, "mlp_bias", False)
        # Fused [gate | up] projection; the loader packs gate_proj and up_proj into it.
        self.gate_up_proj = MergedColumnParallelLinear(
            config.hidden_size, [config.intermediate_size] * 2, bias=bias,
            quant_config=quant_config, prefix=f"{prefix}.gate_up_proj")
        self.gate_up_proj.gates_swiglu = True
        self.down_proj = RowParallelLinear(config.intermediate_size, config.hidden_size,
                                           bias=bias, quant_config=quant_config,
                                           prefix=f"{prefix}.down_proj")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Gated in the gate_up GEMM (bf16 dot-product kernel), or in the down projection's
        # packing of its input (panel kernels), or by the separate op.
        if self.gate_up_proj.fuses_swiglu:
            return self.down_proj(self.gate_up_proj.swiglu(x))
        return self.down_proj.after_silu_and_mul(self.gate_up_proj(x))


class LlamaDecoderLayer(nn.Module):
    def __init__(
        self,
        config: LlamaConfig,
        rotary: RotaryEmbedding,
        backend: AttentionBackend,
        quant_config: QuantizationConfig | None = None,
        prefix: str = "",
        attention_cls: type[LlamaAttention] = LlamaAttention,
    ) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = attention_cls(config, rotary, backend, quant_config,
                                       prefix=f"{prefix}.self_attn")
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = LlamaMLP(config, quant_config, prefix=f"{prefix}.mlp")

    def forward(
        self,
        positions: torch.Tensor,
        hidden: torch.Tensor,
        residual: torch.Tensor | None,
        kv_cache: torch.Tensor,
        metadata: AttentionMetadata,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (this layer's MLP output, the residual stream before it).

        The residual add is deferred into the next norm (fused add + RMSNorm), so the stream is
        hidden + residual; the first layer gets residual=None (the embeddings are the stream).
        """
        if residual is None:
            residual = hidden
            hidden = self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(positions, hidden, kv_cache, metadata)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden), residual


class LlamaForCausalLM(CausalLMBase):
    """The model; `forward` returns hidden states and `compute_logits` runs only the rows asked."""

    # Checkpoint projection name -> (fused parameter name, shard index).
    packed_modules: ClassVar[dict[str, tuple[str, int]]] = {
        "q_proj": ("qkv_proj", 0),
        "k_proj": ("qkv_proj", 1),
        "v_proj": ("qkv_proj", 2),
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
    }
    weight_mapping = WeightMapping(prefixes={"model.": ""}, packed_modules=packed_modules,
                                   ignored_suffixes=("rotary_emb.inv_freq",))

    # Module types timed by the step profiler.
    profiled_modules: ClassVar[dict[str, type[nn.Module]]] = {
        "attention block": LlamaAttention, "mlp": LlamaMLP}
    # Each layer's attention (a family's subclass: Qwen2's biases, Qwen3's head norms).
    attention_cls: ClassVar[type[LlamaAttention]] = LlamaAttention

    def __init__(self, config: LlamaConfig, backend: AttentionBackend, max_position: int,
                 quant_config: QuantizationConfig | None = None) -> None:
        super().__init__(config)
        head_size = getattr(config, "head_dim", None) or (
            config.hidden_size // config.num_attention_heads
        )
        self.rotary = RotaryEmbedding(config, head_size, max_position)
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size,
                                                   prefix="embed_tokens")
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(config, self.rotary, self.layer_backend(config, backend, i),
                              quant_config, prefix=f"layers.{i}",
                              attention_cls=self.attention_cls)
            for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        if not getattr(config, "tie_word_embeddings", False):
            self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size,
                                          quant_config=quant_config, prefix="lm_head")
        # The layers as one native call, set by pack_weights() where every part is native.
        self.native_stack: NativeDecoderStack | None = None

    def layer_backend(self, config: LlamaConfig, backend: AttentionBackend,
                      index: int) -> AttentionBackend:
        """Layer `index`'s attention backend: the model's (a family may give a layer its own,
        e.g. Mistral's sliding windows)."""
        return backend

    def get_input_embeddings(self) -> VocabParallelEmbedding:
        return self.embed_tokens

    def init_buffers(self) -> None:
        self.rotary.init_buffers()

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[torch.Tensor],
        metadata: AttentionMetadata,
    ) -> torch.Tensor:
        # input_ids, positions: [num_tokens] -> hidden: [num_tokens, hidden_size]
        hidden = self.embed_tokens(input_ids)
        stack = self.native_stack
        if stack is not None and stack.applies(hidden, kv_caches):
            return stack(hidden, positions, kv_caches, metadata)
        residual = None
        for layer, kv_cache in zip(self.layers, kv_caches):
            hidden, residual = layer(positions, hidden, residual, kv_cache, metadata)
        if residual is None:  # no layers
            return self.norm(hidden)
        hidden, _ = self.norm(hidden, residual)
        return hidden

    def pack_weights(self, allocate: Allocate | None = None) -> int:
        """Packs as every model does (CausalLMBase), then makes the layers one native call
        where every part of them is native."""
        count = super().pack_weights(allocate)
        self.native_stack = NativeDecoderStack.build(self)
        return count

    def attach_profiler(self, profiler: StepProfiler) -> None:
        """Has the native stack time its blocks (as the module hooks name theirs) and parts."""
        if self.native_stack is not None:
            self.native_stack.profiler = profiler
