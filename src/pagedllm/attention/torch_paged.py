"""The reference attention backend: paged KV cache read through block tables, in pure torch.

It favours clarity over speed: one `scaled_dot_product_attention` call per sequence, on that
sequence's own blocks only. Faster backends are checked against this one.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F

from pagedllm.attention.backend import AttentionBackend, AttentionMetadata

# An fp8 cache (kv_cache_dtype="fp8"): e5m2 values, written saturated at its largest finite one.
FP8_KV_DTYPE = torch.float8_e5m2
FP8_KV_MAX = 57344.0


def quantize_kv(x: torch.Tensor, cache_dtype: torch.dtype) -> torch.Tensor:
    """x in the cache's element type: itself, or (fp8) each value rounded to the nearest e5m2,
    ties to even, saturated at +-57344 (the fused kernel writes the same bytes)."""
    if cache_dtype != FP8_KV_DTYPE:
        return x
    return x.float().clamp(-FP8_KV_MAX, FP8_KV_MAX).to(FP8_KV_DTYPE)


def dequantize_kv(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Cached values in `dtype` (exact: every e5m2 value is a bf16 and an fp32)."""
    return x if x.dtype == dtype else x.to(dtype)


# An int8 cache (kv_cache_dtype="int8"): each (token, kv head) row holds head_size int8 values,
# then their fp32 scale as 4 bytes, so the cache's last dim is head_size + INT8_SCALE_BYTES.
INT8_KV_DTYPE = torch.int8
INT8_SCALE_BYTES = 4


def kv_cache_row_size(head_size: int, cache_dtype: torch.dtype) -> int:
    """The last dim of a cache of `cache_dtype`: head_size, plus the scale's bytes for int8."""
    return head_size + INT8_SCALE_BYTES if cache_dtype == INT8_KV_DTYPE else head_size


def quantize_int8_rows(x: torch.Tensor) -> torch.Tensor:
    """[..., d] -> [..., d + 4] int8 rows: round(x / scale) to nearest even, scale = max |x| /
    127 in fp32 (0, and all values 0, for a row of zeros), its bytes after the values (the fused
    kernel writes the same bytes)."""
    xf = x.float()
    scale = xf.abs().amax(-1, keepdim=True) / 127
    q = torch.where(scale > 0, torch.round(xf / scale), 0.0).clamp(-127, 127).to(torch.int8)
    return torch.cat([q, scale.view(torch.int8)], dim=-1)


def dequantize_int8_rows(rows: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[..., d + 4] int8 rows -> [..., d] values value * scale (fp32), in `dtype`.

    The reference attends over these values in the query's dtype. The fused kernel, under a bf16
    query, reads the int8 values in place instead (integer dot products, scales applied to the
    sums: see paged_attention.cpp), which lands nearer the exact attention over the fp32 values
    than their bf16 rounding does (tests/attention/test_kv_cache_8bit.py)."""
    scale = rows[..., -INT8_SCALE_BYTES:].contiguous().view(torch.float32)  # [..., 1]
    return (rows[..., :-INT8_SCALE_BYTES].float() * scale).to(dtype)


class TorchPagedAttention(AttentionBackend):
    """Correct-first paged attention on any device torch supports (the CPU default).

    Invariants: it never gathers the whole cache and never pads sequences to the longest one;
    each sequence reads exactly ceil(seq_len / block_size) blocks (with a sliding window, only
    those its queries' windows reach) and trims them to seq_len.
    """

    name: ClassVar[str] = "torch_paged"

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        metadata: AttentionMetadata,
    ) -> torch.Tensor:
        """Stores key/value at `metadata.slot_mapping`, then attends causally per sequence;
        the output is in query's dtype."""
        assert query.shape[0] == metadata.num_tokens, (query.shape, metadata.num_tokens)
        self.write_kv(key, value, kv_cache, metadata.slot_mapping)

        # NOTE: an fp8 cache is gathered as bytes (torch has no index ops for float8) and
        # dequantized per sequence, in the query's dtype.
        fp8, int8 = kv_cache.dtype == FP8_KV_DTYPE, kv_cache.dtype == INT8_KV_DTYPE
        raw = kv_cache.view(torch.uint8) if fp8 else kv_cache
        key_cache, value_cache = raw[0], raw[1]  # [num_blocks, block_size, kv_h, d]
        output = torch.empty_like(query)  # [num_tokens, num_heads, head_size]
        # Walk the host copies so that no step here waits on the device.
        start = 0
        for i, (query_len, seq_len) in enumerate(
            zip(metadata.query_lens_cpu, metadata.seq_lens_cpu)
        ):
            end = start + query_len
            # Blocks wholly before every query's window are neither read nor (once the block
            # manager frees them) valid: start at the first block the first query sees.
            first_key = self._first_key(seq_len - query_len)
            first_block = first_key // self.block_size
            num_blocks = -(-seq_len // self.block_size)
            block_ids = metadata.block_tables[i, first_block:num_blocks]  # [num_blocks]
            # Gather this sequence's blocks only, in logical order, then drop the unused tail.
            # NOTE: index_select rather than key_cache[block_ids]: on CPU it is ~4x faster and
            # takes the int32 block ids without a conversion.
            key_start = first_block * self.block_size
            num_keys = seq_len - key_start
            k = key_cache.index_select(0, block_ids).flatten(0, 1)[:num_keys]  # [keys, kv_h, d]
            v = value_cache.index_select(0, block_ids).flatten(0, 1)[:num_keys]  # [keys, kv_h, d]
            if fp8:
                k = dequantize_kv(k.view(FP8_KV_DTYPE), query.dtype)
                v = dequantize_kv(v.view(FP8_KV_DTYPE), query.dtype)
            elif int8:
                k = dequantize_int8_rows(k, query.dtype)
                v = dequantize_int8_rows(v, query.dtype)
            output[start:end] = self._attend(query[start:end], k, v)
            start = end
        return output

    def write_kv(
        self,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        slot_mapping: torch.Tensor,
    ) -> None:
        """Copies each new token's key/value into its flat slot of the cache.

        Args:
            key, value: [num_tokens, num_kv_heads, head_size]
            kv_cache: [2, num_blocks, block_size, num_kv_heads, head_size], updated in place;
                an fp8 one takes the values rounded (quantize_kv), an int8 one quantized rows
                (quantize_int8_rows).
            slot_mapping: [num_tokens] int64, block_id * block_size + offset.
        """
        if kv_cache.dtype == FP8_KV_DTYPE:  # torch has no index_copy_ for float8: as bytes
            key = quantize_kv(key, FP8_KV_DTYPE).view(torch.uint8)
            value = quantize_kv(value, FP8_KV_DTYPE).view(torch.uint8)
            kv_cache = kv_cache.view(torch.uint8)
        elif kv_cache.dtype == INT8_KV_DTYPE:
            key, value = quantize_int8_rows(key), quantize_int8_rows(value)
        # NOTE: `view`, not `reshape`: a reshape of a non-contiguous cache would silently copy,
        # and the write would land in the copy instead of the cache.
        num_slots = kv_cache.shape[1] * kv_cache.shape[2]
        flat_cache = kv_cache.view(2, num_slots, self.num_kv_heads, kv_cache.shape[-1])
        flat_cache[0].index_copy_(0, slot_mapping, key)  # [num_slots, kv_h, d]
        flat_cache[1].index_copy_(0, slot_mapping, value)  # [num_slots, kv_h, d]

    def _first_key(self, first_query_pos: int) -> int:
        """The first key position a query at `first_query_pos` (or later) may see."""
        if self.sliding_window is None:
            return 0
        return max(0, first_query_pos - self.sliding_window + 1)

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Causal attention for a query chunk sitting at the end of its context.

        Args:
            q: [query_len, num_heads, head_size]
            k, v: [seq_len, num_kv_heads, head_size]: the context's keys, or with a sliding
                window its last seq_len ones (the others lie outside every query's window);
                positions below count from the first of them.
        Returns:
            [query_len, num_heads, head_size]
        """
        if self.sliding_window is not None or self.logits_soft_cap is not None:
            return self._attend_masked(q, k, v)
        query_len, seq_len = q.shape[0], k.shape[0]
        num_cached = seq_len - query_len
        # Query j sits at position num_cached + j and sees key positions 0..num_cached + j.
        # E.g., num_cached 2, query_len 2 -> mask [[1, 1, 1, 0], [1, 1, 1, 1]]
        # NOTE: SDPA's is_causal aligns the mask to the top-left corner, which is only right
        # when there is no cached context; a chunk on top of a context needs the explicit mask.
        attn_mask: torch.Tensor | None = None
        is_causal = False
        if query_len > 1 and num_cached == 0:
            is_causal = True
        elif query_len > 1:
            attn_mask = torch.ones(query_len, seq_len, dtype=torch.bool, device=q.device).tril(
                diagonal=num_cached
            )  # [query_len, seq_len]
        # A single query token (decode) sees the whole context: no mask.

        # NOTE: enable_gqa lets query head h read kv head h // (num_heads // num_kv_heads)
        # without repeating K/V; it matches repeat_interleave exactly on CPU in torch 2.13.
        # The leading batch dim of 1 is not cosmetic: on CPU, SDPA's fused (flash) kernel only
        # takes 4-D inputs, and 3-D ones fall back to the slower unfused math path.
        out = F.scaled_dot_product_attention(
            q.transpose(0, 1).unsqueeze(0),  # [1, num_heads, query_len, d]
            k.transpose(0, 1).unsqueeze(0),  # [1, kv_h, seq_len, d]
            v.transpose(0, 1).unsqueeze(0),  # [1, kv_h, seq_len, d]
            attn_mask=attn_mask,
            is_causal=is_causal,
            scale=self.scale,
            enable_gqa=self.num_heads != self.num_kv_heads,
        )  # [1, num_heads, query_len, d]
        return out[0].transpose(0, 1)  # [query_len, num_heads, d]

    def _attend_masked(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """`_attend` with a sliding window and/or soft-capped scores, written out in fp32."""
        query_len, seq_len = q.shape[0], k.shape[0]
        # Query j sits at position seq_len - query_len + j, key t at t.
        # E.g., seq_len 4, query_len 2, window 2 -> query positions [2, 3]:
        #   visible [[0, 1, 1, 0], [0, 0, 1, 1]]
        q_pos = torch.arange(seq_len - query_len, seq_len, device=q.device)[:, None]
        k_pos = torch.arange(seq_len, device=q.device)[None, :]
        visible = k_pos <= q_pos  # [query_len, seq_len]
        if self.sliding_window is not None:
            visible &= k_pos > q_pos - self.sliding_window
        group = self.num_heads // self.num_kv_heads
        qf = q.float().transpose(0, 1)  # [num_heads, query_len, d]
        kf = k.float().transpose(0, 1).repeat_interleave(group, dim=0)  # [num_heads, seq_len, d]
        vf = v.float().transpose(0, 1).repeat_interleave(group, dim=0)
        scores = torch.matmul(qf, kf.transpose(1, 2)) * self.scale  # [num_heads, q_len, seq_len]
        if self.logits_soft_cap is not None:
            scores = torch.tanh(scores / self.logits_soft_cap) * self.logits_soft_cap
        scores = scores.masked_fill(~visible, float("-inf"))
        out = torch.matmul(torch.softmax(scores, dim=-1), vf)  # [num_heads, query_len, d]
        return out.transpose(0, 1).to(q.dtype)
