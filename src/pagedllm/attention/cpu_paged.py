"""A fused PagedAttention backend for CPU: C++/OpenMP, built on first use, torch fallback.

The kernel (`pagedllm/ops/csrc/paged_attention.cpp`) writes the new K/V into their slots and
attends causally through the block tables, reading K/V in place from the block pool. It is
built with the other native ops (see `pagedllm.ops.cpu_extension`); where that build fails or
PAGEDLLM_DISABLE_CPU_KERNEL=1 is set, every call takes the `torch_paged` reference path.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from pagedllm.attention.backend import AttentionMetadata
from pagedllm.attention.torch_paged import FP8_KV_DTYPE, INT8_KV_DTYPE, TorchPagedAttention
from pagedllm.ops import NATIVE_DTYPES, cpu_ops


class CpuPagedAttention(TorchPagedAttention):
    """The `torch_paged` contract, computed by the fused C++ kernel where it applies.

    The kernel takes CPU tensors, a contiguous fp32, bf16, fp8 (e5m2) or int8 cache, key/value
    in the cache's dtype (fp32 or bf16 over an 8-bit one, which the kernel quantizes as it
    writes) and an fp32 or bf16 query; anything else (and a failed build) goes to the reference.
    """

    name: ClassVar[str] = "cpu_paged"

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        metadata: AttentionMetadata,
    ) -> torch.Tensor:
        """The fused C++ kernel where it applies (see the class docstring), else the reference."""
        ops = cpu_ops() if kernel_applies(query, key, value, kv_cache) else None
        if ops is None:
            return super().forward(query, key, value, kv_cache, metadata)
        assert query.shape[0] == metadata.num_tokens, (query.shape, metadata.num_tokens)
        output = torch.empty(query.shape, dtype=query.dtype)  # [num_tokens, num_heads, head_size]
        args = (output, _last_dim_contiguous(query), _last_dim_contiguous(key),
                _last_dim_contiguous(value), kv_cache, *kernel_metadata(metadata), self.scale)
        if self.sliding_window is None and self.logits_soft_cap is None:
            ops.paged_attention(*args)
        else:
            ops.paged_attention_windowed(*args, self.sliding_window or 0,
                                         self.logits_soft_cap or 0.0)
        return output


def kernel_applies(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor
) -> bool:
    """Whether the fused kernel takes these tensors (see `CpuPagedAttention`)."""
    eight_bit = kv_cache.dtype in (FP8_KV_DTYPE, INT8_KV_DTYPE)
    return (
        all(t.device.type == "cpu" for t in (query, key, value, kv_cache))
        and (kv_cache.dtype in NATIVE_DTYPES or eight_bit)
        and query.dtype in NATIVE_DTYPES
        and (key.dtype in NATIVE_DTYPES if eight_bit else key.dtype == kv_cache.dtype)
        and value.dtype == key.dtype
        and kv_cache.is_contiguous()
    )


def int8_kv_read_in_place(head_size: int) -> bool:
    """Whether the kernel reads an int8 cache in place for a bf16 query of this head size
    (integer dot products over the stored values; else it dequantizes each key tile first)."""
    ops = cpu_ops()
    return ops is not None and bool(ops.int8_kv_read_in_place(head_size))


def kernel_metadata(
    metadata: AttentionMetadata,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(slot_mapping, query_start_loc, seq_lens, block_tables) in the dtypes the kernel reads."""
    return (
        _as(metadata.slot_mapping, torch.int64),
        _as(metadata.query_start_loc, torch.int64),
        _as(metadata.seq_lens, torch.int64),
        _as(metadata.block_tables, torch.int32),
    )


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _as(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # NOTE: checks in Python first: this runs per layer per step on the module path, and a
    # no-op `.to()` still costs a dispatcher round trip.
    return t if t.dtype == dtype and t.is_contiguous() else t.to(dtype).contiguous()
