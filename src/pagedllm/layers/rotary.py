"""Rotary position embeddings with a precomputed cos/sin table indexed by absolute position."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from pagedllm.ops import native_ops

if TYPE_CHECKING:
    from transformers import PretrainedConfig

# NOTE: dynamic and longrope scaling change the frequencies with the sequence length, which a
# single table cannot express; they are refused at load time rather than computed wrongly.
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


def rope_inv_freq(config: PretrainedConfig, head_size: int) -> tuple[torch.Tensor, float]:
    """Inverse frequencies and attention scaling for the config's RoPE type (via transformers)."""
    params = dict(getattr(config, "rope_parameters", None) or {})
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(
            f"RoPE type {rope_type!r} is not supported; "
            f"supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    if rope_type == "default":
        base = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
        exponents = torch.arange(0, head_size, 2, dtype=torch.int64).float() / head_size
        return 1.0 / (base ** exponents), 1.0
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS  # scaled types only

    return ROPE_INIT_FUNCTIONS[rope_type](config, device=torch.device("cpu"))


class RotaryEmbedding(nn.Module):
    """Applies RoPE in the rotate-half layout used by Hugging Face Llama checkpoints."""

    def __init__(self, config: PretrainedConfig, head_size: int, max_position: int) -> None:
        super().__init__()
        self.config = config
        self.head_size = head_size
        self.max_position = max_position
        self.register_buffer("cos_cache", torch.empty(max_position, head_size), persistent=False)
        self.register_buffer("sin_cache", torch.empty(max_position, head_size), persistent=False)
        self.init_buffers()

    def init_buffers(self) -> None:
        """Fills the cos/sin table; called again after the model is materialised from `meta`."""
        if self.cos_cache.is_meta:
            return
        inv_freq, scaling = rope_inv_freq(self.config, self.head_size)
        positions = torch.arange(self.max_position, dtype=torch.float32)
        freqs = positions[:, None] * inv_freq[None, :]  # [max_position, head_size // 2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [max_position, head_size]
        # The tables are computed on CPU and moved to wherever the model was materialised.
        self.cos_cache = (emb.cos() * scaling).to(self.cos_cache.device, self.cos_cache.dtype)
        self.sin_cache = (emb.sin() * scaling).to(self.sin_cache.device, self.sin_cache.dtype)

    def forward(
        self, positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # positions: [num_tokens]; query: [num_tokens, heads, head];
        # key: [num_tokens, kv_heads, head]. The fused path rotates query and key in place.
        ops = native_ops(query, key) if query.dtype == key.dtype else None
        if ops is not None:
            cos_table, sin_table = self.float_tables()
            ops.rotary_embedding(positions, query, key, cos_table, sin_table)
            return query, key
        cos = self.cos_cache[positions].to(query.dtype).unsqueeze(1)  # [num_tokens, 1, head]
        sin = self.sin_cache[positions].to(query.dtype).unsqueeze(1)
        return query * cos + _rotate_half(query) * sin, key * cos + _rotate_half(key) * sin

    def float_tables(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The cos/sin tables in fp32, as the fused rotary op reads them."""
        # A bf16 model's buffers are converted once (exactly:
        # bf16 -> fp32 -> bf16 round-trips, so results match the torch path's bf16 tables).
        if self.cos_cache.dtype == torch.float32:
            return self.cos_cache, self.sin_cache
        cached = getattr(self, "_float_cache", None)
        if cached is None or cached[0].shape != self.cos_cache.shape:
            cached = (self.cos_cache.float(), self.sin_cache.float())
            self._float_cache = cached
        return cached


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)
