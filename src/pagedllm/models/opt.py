"""OPT (`OPTForCausalLM`) over a flattened batch with a paged KV cache.

Learned positions offset by 2 (OPT's embedding table keeps two rows ahead of position 0),
LayerNorm before or after each block per `do_layer_norm_before` (OPT-350m normalizes after),
ReLU, and `project_in`/`project_out` around the decoder where `word_embed_proj_dim` differs
from `hidden_size`. The checkpoint's separate q/k/v projections are packed into one.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import torch
from torch import nn

from pagedllm.attention import AttentionBackend, AttentionMetadata
from pagedllm.layers.act_fn import get_act_fn
from pagedllm.layers.linear import (
    ColumnParallelLinear,
    QKVParallelLinear,
    ReplicatedLinear,
    RowParallelLinear,
)
from pagedllm.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding
from pagedllm.models.interface import CausalLMBase, WeightMapping

if TYPE_CHECKING:
    from transformers import OPTConfig


# OPT's learned positions start at row 2 of their table (a fairseq padding convention).
POSITION_OFFSET = 2


class OPTAttention(nn.Module):
    def __init__(self, config: OPTConfig, backend: AttentionBackend) -> None:
        super().__init__()
        hidden_size = config.hidden_size
        self.head_size = hidden_size // config.num_attention_heads
        # Fused [q | k | v] projection; load_weights packs q_proj, k_proj and v_proj into it.
        self.qkv_proj = QKVParallelLinear(hidden_size, self.head_size,
                                          config.num_attention_heads, bias=config.enable_bias)
        self.num_heads = self.qkv_proj.num_heads  # this rank's
        self.out_proj = RowParallelLinear(hidden_size, hidden_size, bias=config.enable_bias)
        # NOTE: OPT scales q by head_size**-0.5 after its projection; the backend applies the
        # same scale to the scores.
        self.backend = backend

    def forward(
        self, hidden: torch.Tensor, kv_cache: torch.Tensor, metadata: AttentionMetadata
    ) -> torch.Tensor:
        # hidden: [num_tokens, hidden_size]
        num_tokens = hidden.shape[0]
        q_size = self.num_heads * self.head_size
        q, k, v = self.qkv_proj(hidden).split(q_size, dim=-1)
        shape = (num_tokens, self.num_heads, self.head_size)
        out = self.backend.forward(q.view(shape), k.view(shape), v.view(shape), kv_cache,
                                   metadata)  # [num_tokens, heads, head]
        return self.out_proj(out.reshape(num_tokens, q_size))


class OPTMLP(nn.Module):
    def __init__(self, config: OPTConfig) -> None:
        super().__init__()
        self.fc1 = ColumnParallelLinear(config.hidden_size, config.ffn_dim,
                                        bias=config.enable_bias)
        self.fc2 = RowParallelLinear(config.ffn_dim, config.hidden_size, bias=config.enable_bias)
        self.act = get_act_fn(config.activation_function)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class OPTDecoderLayer(nn.Module):
    def __init__(self, config: OPTConfig, backend: AttentionBackend) -> None:
        super().__init__()
        affine = config.layer_norm_elementwise_affine
        self.norm_before = config.do_layer_norm_before
        self.self_attn_layer_norm = nn.LayerNorm(config.hidden_size, elementwise_affine=affine)
        self.self_attn = OPTAttention(config, backend)
        self.final_layer_norm = nn.LayerNorm(config.hidden_size, elementwise_affine=affine)
        self.mlp = OPTMLP(config)

    def forward(
        self, hidden: torch.Tensor, kv_cache: torch.Tensor, metadata: AttentionMetadata
    ) -> torch.Tensor:
        if self.norm_before:  # x + f(norm(x)), both blocks
            hidden = hidden + self.self_attn(self.self_attn_layer_norm(hidden), kv_cache,
                                             metadata)
            return hidden + self.mlp(self.final_layer_norm(hidden))
        # norm(x + f(x)), both blocks
        hidden = self.self_attn_layer_norm(hidden + self.self_attn(hidden, kv_cache, metadata))
        return self.final_layer_norm(hidden + self.mlp(hidden))


class OPTForCausalLM(CausalLMBase):
    """OPT; parameters are named as the checkpoint's without `model.decoder.`, except that the
    MLP's fc1/fc2 sit under `mlp.` and q/k/v are packed into `qkv_proj`."""

    weight_mapping = WeightMapping(
        # save_pretrained writes model.decoder..., the original hub checkpoints decoder....
        prefixes={"model.decoder.": "", "decoder.": ""},
        packed_modules={
            "q_proj": ("qkv_proj", 0),
            "k_proj": ("qkv_proj", 1),
            "v_proj": ("qkv_proj", 2),
        },
        renamed_modules={"fc1": "mlp.fc1", "fc2": "mlp.fc2"},
    )
    profiled_modules: ClassVar[dict[str, type[nn.Module]]] = {
        "attention block": OPTAttention, "mlp": OPTMLP}

    def __init__(self, config: OPTConfig, backend: AttentionBackend, max_position: int) -> None:
        super().__init__(config)
        hidden_size, embed_dim = config.hidden_size, config.word_embed_proj_dim
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, embed_dim)
        self.embed_positions = nn.Embedding(
            config.max_position_embeddings + POSITION_OFFSET, hidden_size
        )
        projects = embed_dim != hidden_size
        self.project_in = ReplicatedLinear(embed_dim, hidden_size, bias=False) if projects else None
        self.project_out = (ReplicatedLinear(hidden_size, embed_dim, bias=False) if projects
                            else None)
        self.layers = nn.ModuleList(
            OPTDecoderLayer(config, backend) for _ in range(config.num_hidden_layers)
        )
        # OPT-350m (norms after each block) and checkpoints fine-tuned before transformers
        # 4.20.1 (`_remove_final_layer_norm`) have no final norm.
        self.final_layer_norm = (
            nn.LayerNorm(hidden_size, elementwise_affine=config.layer_norm_elementwise_affine)
            if config.do_layer_norm_before and not config._remove_final_layer_norm
            else None
        )
        if not config.tie_word_embeddings:
            self.lm_head = ParallelLMHead(config.vocab_size, embed_dim)

    def get_input_embeddings(self) -> VocabParallelEmbedding:
        return self.embed_tokens

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[torch.Tensor],
        metadata: AttentionMetadata,
    ) -> torch.Tensor:
        # input_ids, positions: [num_tokens] -> hidden: [num_tokens, word_embed_proj_dim]
        hidden = self.embed_tokens(input_ids)
        if self.project_in is not None:
            hidden = self.project_in(hidden)
        hidden = hidden + self.embed_positions(positions + POSITION_OFFSET)
        for layer, kv_cache in zip(self.layers, kv_caches):
            hidden = layer(hidden, kv_cache, metadata)
        if self.final_layer_norm is not None:
            hidden = self.final_layer_norm(hidden)
        if self.project_out is not None:
            hidden = self.project_out(hidden)
        return hidden
