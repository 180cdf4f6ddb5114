"""Rotary position embeddings with a precomputed cos/sin table indexed by absolute position."""

from __future__ import annotations

import torch
from torch import nn
from transformers import PretrainedConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

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
        self.cos_cache = (emb.cos() * scaling).to(self.cos_cache.dtype)
        self.sin_cache = (emb.sin() * scaling).to(self.sin_cache.dtype)

    def forward(
        self, positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # positions: [num_tokens]; query: [num_tokens, heads, head];
        # key: [num_tokens, kv_heads, head]
        cos = self.cos_cache[positions].to(query.dtype).unsqueeze(1)  # [num_tokens, 1, head]
        sin = self.sin_cache[positions].to(query.dtype).unsqueeze(1)
        return query * cos + _rotate_half(query) * sin, key * cos + _rotate_half(key) * sin


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)
