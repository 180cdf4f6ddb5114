"""Attention backends over the paged KV cache: the seam, the registry and the metadata builder."""

from pagedllm.attention.backend import AttentionBackend, AttentionMetadata
from pagedllm.attention.metadata import build_attention_metadata
from pagedllm.attention.registry import (
    DEFAULT_ATTENTION_BACKEND,
    available_attention_backends,
    get_attention_backend,
)

__all__ = [
    "DEFAULT_ATTENTION_BACKEND",
    "AttentionBackend",
    "AttentionMetadata",
    "available_attention_backends",
    "build_attention_metadata",
    "get_attention_backend",
]
