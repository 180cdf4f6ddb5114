"""The attention-backend seam: metadata describing one flattened batch, and the backend ABC."""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch


@dataclass
class AttentionMetadata:
    """Describes one flattened batch of `num_tokens` new query tokens from `num_seqs` sequences.

    Sequence i contributes rows `query_start_loc[i]:query_start_loc[i+1]` of the flat batch.
    Its context after this step holds `seq_lens[i]` tokens: the tokens already cached plus
    the new ones, whose K/V the backend writes before attending.

        |<------------- seq_len ------------->|
        |<-- cached (context) -->|<- query -->|
                                 ^ positions seq_len - query_len .. seq_len - 1

    Query token j of sequence i sits at position `seq_lens[i] - query_len_i + j` and attends
    causally to positions 0..that position (a backend with a sliding window W: to the last W of
    them, positions - W + 1..that position).
    """

    num_seqs: int
    num_tokens: int
    # [num_seqs + 1] int64: cumulative query lengths, starting at 0.
    query_start_loc: torch.Tensor
    # [num_seqs] int64: context length of each sequence after this step (cached + new tokens).
    seq_lens: torch.Tensor
    # [num_seqs, max_num_blocks] int32: physical block ids; row i is valid for
    # ceil(seq_lens[i] / block_size) entries, the rest is padding (0).
    block_tables: torch.Tensor
    # [num_tokens] int64: flat slot (block_id * block_size + offset) of each new token's K/V.
    slot_mapping: torch.Tensor
    # Host copies, for backends that loop over sequences.
    query_lens_cpu: list[int]
    seq_lens_cpu: list[int]
    max_query_len: int
    max_seq_len: int


class AttentionBackend(ABC):
    """Writes new keys/values into the paged KV cache and attends through block tables.

    The cache of one layer is a single tensor of shape `kv_cache_shape(...)`; keys and values of
    logical token t of a sequence live at physical block `block_table[t // block_size]`, offset
    `t % block_size`.

    A layer may attend differently from the others (a sliding window, soft-capped scores, its
    own scale): its backend is `for_layer(...)` of the worker's, sharing the cache layout.
    """

    name: ClassVar[str]
    # Each query attends to the last `sliding_window` positions (itself included); None: all.
    sliding_window: int | None = None
    # Scores become cap * tanh(score / cap) before the softmax (Gemma 2); None: unchanged.
    logits_soft_cap: float | None = None

    def __init__(
        self, num_heads: int, num_kv_heads: int, head_size: int, scale: float, block_size: int
    ) -> None:
        if num_heads % num_kv_heads != 0:
            raise ValueError(
                f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})"
            )
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_size = head_size
        self.scale = scale
        self.block_size = block_size

    def for_layer(self, *, scale: float | None = None, sliding_window: int | None = None,
                  logits_soft_cap: float | None = None) -> AttentionBackend:
        """A copy of this backend for one layer: its own scale (None: this one's), sliding
        window and soft cap (None: none)."""
        if sliding_window is not None and (not isinstance(sliding_window, int)
                                           or sliding_window < 1):
            raise ValueError(f"sliding_window must be a positive int or None, got "
                             f"{sliding_window!r}")
        if logits_soft_cap is not None and not logits_soft_cap > 0:
            raise ValueError(f"logits_soft_cap must be > 0 or None, got {logits_soft_cap!r}")
        layer = copy.copy(self)
        layer.scale = self.scale if scale is None else scale
        layer.sliding_window = sliding_window
        layer.logits_soft_cap = logits_soft_cap
        return layer

    @staticmethod
    def kv_cache_shape(
        num_blocks: int, block_size: int, num_kv_heads: int, head_size: int
    ) -> tuple[int, ...]:
        """Shape of one layer's cache: [2 (key, value), num_blocks, block_size, kv_heads, head]
        (an int8 cache's rows hold their scale too: head is torch_paged.kv_cache_row_size)."""
        return (2, num_blocks, block_size, num_kv_heads, head_size)

    @abstractmethod
    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        metadata: AttentionMetadata,
    ) -> torch.Tensor:
        """Stores key/value at `metadata.slot_mapping`, then attends.

        Args:
            query: [num_tokens, num_heads, head_size]
            key, value: [num_tokens, num_kv_heads, head_size]
            kv_cache: [2, num_blocks, block_size, num_kv_heads, head_size], updated in place.
        Returns:
            [num_tokens, num_heads, head_size]
        """
