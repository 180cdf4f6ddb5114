"""GPT-2 (`GPT2LMHeadModel`) over a flattened batch with a paged KV cache.

Learned positions, pre-LayerNorm blocks, biases everywhere, GELU (the tanh approximation for
the configs' `gelu_new`) and a head tied to the token embedding unless the config unties it.
The checkpoint stores its projections as Conv1D, [in, out]; they are transposed on load.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import torch
from torch import nn

from pagedllm.attention import AttentionBackend, AttentionMetadata
from pagedllm.layers.act_fn import get_act_fn
from pagedllm.layers.linear import ColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from pagedllm.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding
from pagedllm.models.interface import CausalLMBase, WeightMapping

if TYPE_CHECKING:
    from transformers import GPT2Config


class GPT2Attention(nn.Module):
    def __init__(self, config: GPT2Config, layer_idx: int, backend: AttentionBackend) -> None:
        super().__init__()
        hidden_size = config.hidden_size
        self.head_size = hidden_size // config.num_attention_heads
        # Fused [q | k | v] projection, as the checkpoint stores it (split by heads over ranks).
        self.c_attn = QKVParallelLinear(hidden_size, self.head_size, config.num_attention_heads)
        self.num_heads = self.c_attn.num_heads  # this rank's
        self.c_proj = RowParallelLinear(hidden_size, hidden_size)
        self.backend = backend
        scale = self.head_size**-0.5 if config.scale_attn_weights else 1.0
        if config.scale_attn_by_inverse_layer_idx:
            scale /= layer_idx + 1
        # The backend scales by head_size**-0.5 for every layer; q makes up the difference.
        self.q_scale = scale / backend.scale

    def forward(
        self, hidden: torch.Tensor, kv_cache: torch.Tensor, metadata: AttentionMetadata
    ) -> torch.Tensor:
        # hidden: [num_tokens, hidden_size]
        num_tokens = hidden.shape[0]
        q_size = self.num_heads * self.head_size
        q, k, v = self.c_attn(hidden).split(q_size, dim=-1)
        if self.q_scale != 1.0:
            q = q * self.q_scale
        shape = (num_tokens, self.num_heads, self.head_size)
        out = self.backend.forward(q.view(shape), k.view(shape), v.view(shape), kv_cache,
                                   metadata)  # [num_tokens, heads, head]
        return self.c_proj(out.reshape(num_tokens, q_size))


class GPT2MLP(nn.Module):
    def __init__(self, config: GPT2Config) -> None:
        super().__init__()
        inner_size = config.n_inner or 4 * config.hidden_size
        self.c_fc = ColumnParallelLinear(config.hidden_size, inner_size)
        self.c_proj = RowParallelLinear(inner_size, config.hidden_size)
        self.act = get_act_fn(config.activation_function)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.act(self.c_fc(x)))


class GPT2Block(nn.Module):
    def __init__(self, config: GPT2Config, layer_idx: int, backend: AttentionBackend) -> None:
        super().__init__()
        eps = config.layer_norm_epsilon
        self.ln_1 = nn.LayerNorm(config.hidden_size, eps=eps)
        self.attn = GPT2Attention(config, layer_idx, backend)
        self.ln_2 = nn.LayerNorm(config.hidden_size, eps=eps)
        self.mlp = GPT2MLP(config)

    def forward(
        self, hidden: torch.Tensor, kv_cache: torch.Tensor, metadata: AttentionMetadata
    ) -> torch.Tensor:
        hidden = hidden + self.attn(self.ln_1(hidden), kv_cache, metadata)
        return hidden + self.mlp(self.ln_2(hidden))


class GPT2LMHeadModel(CausalLMBase):
    """GPT-2; parameters are named as the checkpoint's without `transformer.`."""

    weight_mapping = WeightMapping(
        # Hub checkpoints name h.0..., save_pretrained writes transformer.h.0...
        prefixes={"transformer.": ""},
        # The causal-mask buffers that older checkpoints saved.
        ignored_suffixes=(".attn.bias", ".attn.masked_bias"),
        transposed_suffixes=("c_attn.weight", "c_proj.weight", "c_fc.weight"),
    )
    profiled_modules: ClassVar[dict[str, type[nn.Module]]] = {
        "attention block": GPT2Attention, "mlp": GPT2MLP}

    def __init__(self, config: GPT2Config, backend: AttentionBackend, max_position: int) -> None:
        super().__init__(config)
        if config.add_cross_attention:
            raise ValueError("GPT-2 with add_cross_attention (an encoder-decoder's decoder) is "
                             "not supported: pagedllm serves decoder-only models")
        self.wte = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        self.wpe = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.h = nn.ModuleList(
            GPT2Block(config, i, backend) for i in range(config.num_hidden_layers)
        )
        self.ln_f = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        if not config.tie_word_embeddings:
            self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size)

    def get_input_embeddings(self) -> VocabParallelEmbedding:
        return self.wte

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[torch.Tensor],
        metadata: AttentionMetadata,
    ) -> torch.Tensor:
        # input_ids, positions: [num_tokens] -> hidden: [num_tokens, hidden_size]
        hidden = self.wte(input_ids) + self.wpe(positions)
        for block, kv_cache in zip(self.h, kv_caches):
            hidden = block(hidden, kv_cache, metadata)
        return self.ln_f(hidden)
