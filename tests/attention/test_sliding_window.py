"""Sliding windows and soft-capped scores (Mistral, Gemma): the fused kernel against the
reference, blocks before every window never weighed, and a windowed query's bits independent
of how its sequence is computed (batch invariance, as for full attention)."""

from __future__ import annotations

import pytest
import torch
from test_attention_invariance import Sequences, schedules
from torch_threads import num_threads

from pagedllm.attention import build_attention_metadata
from pagedllm.attention.cpu_paged import CpuPagedAttention
from pagedllm.attention.torch_paged import (
    INT8_KV_DTYPE,
    TorchPagedAttention,
    kv_cache_row_size,
    quantize_int8_rows,
)
from pagedllm.ops import cpu_extension

# (num_cached_tokens, query_len) per sequence, in one batch: prefills, chunks on a context,
# decodes, a long decode and a long chunk (several key segments).
BATCH = [(0, 9), (0, 1), (11, 5), (37, 1), (0, 70), (64, 1), (20, 12), (300, 1), (130, 40)]
# Few long sequences: the kernel splits their key ranges over the threads.
SPLIT_BATCH = [(1500, 1), (700, 17)]


@pytest.fixture(scope="module", autouse=True)
def kernel() -> None:
    if cpu_extension.cpu_ops() is None:
        pytest.skip(f"cpu_paged kernel unavailable: {cpu_extension.cpu_ops_error()}")


def run_both(batch, block_size, num_heads, num_kv_heads, head_size, dtype, window, soft_cap,
             seed=0, free_before_window=False, cache_dtype=None):
    gen = torch.Generator().manual_seed(seed)
    seq_lens = [c + q for c, q in batch]
    query_lens = [q for _, q in batch]
    needed = [-(-n // block_size) for n in seq_lens]
    num_blocks = sum(needed) + 1
    perm = torch.randperm(num_blocks - 1, generator=gen).add(1).tolist()
    tables = []
    for (num_cached, _), n in zip(batch, needed):
        table = perm[:n]
        perm = perm[n:]
        if free_before_window and window is not None:
            # As the block manager leaves them: blocks wholly before the first query's window
            # point at block 0, which holds other data (large noise, never to be weighed).
            first = max(0, num_cached - window + 1) // block_size
            table = [0] * first + table[first:]
        tables.append(table)
    metadata = build_attention_metadata(query_lens, seq_lens, tables, block_size)
    shape = TorchPagedAttention.kv_cache_shape(num_blocks, block_size, num_kv_heads, head_size)
    cache = torch.randn(shape, generator=gen)
    cache[:, 0] *= 1000
    # An int8 cache: the rows quantized with their scales (cache_dtype), else the model's dtype.
    cache = quantize_int8_rows(cache) if cache_dtype == INT8_KV_DTYPE else cache.to(dtype)
    assert cache.shape[-1] == kv_cache_row_size(head_size, cache.dtype)
    num_tokens = sum(query_lens)
    q = torch.randn(num_tokens, num_heads, head_size, generator=gen).to(dtype)
    k = torch.randn(num_tokens, num_kv_heads, head_size, generator=gen).to(dtype)
    v = torch.randn(num_tokens, num_kv_heads, head_size, generator=gen).to(dtype)
    args = (num_heads, num_kv_heads, head_size, head_size**-0.5, block_size)
    options = {"sliding_window": window, "logits_soft_cap": soft_cap}
    ref = TorchPagedAttention(*args).for_layer(**options)
    fused = CpuPagedAttention(*args).for_layer(**options)
    expected = ref.forward(q, k, v, cache.clone(), metadata)
    got = fused.forward(q, k, v, cache.clone(), metadata)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.float(), expected.float(), atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("window,soft_cap", [(1, None), (7, None), (40, None), (300, None),
                                             (None, 3.0), (40, 3.0)])
@pytest.mark.parametrize("shape", [(9, 3, 64, 16), (6, 2, 20, 5)], ids=["gqa-64", "head20-b5"])
def test_kernel_matches_reference(shape, window, soft_cap, dtype) -> None:
    num_heads, num_kv_heads, head_size, block_size = shape
    run_both(BATCH, block_size, num_heads, num_kv_heads, head_size, dtype, window, soft_cap,
             free_before_window=True)
    with num_threads(4):
        run_both(SPLIT_BATCH, block_size, num_heads, num_kv_heads, head_size, dtype, window,
                 soft_cap, seed=1, free_before_window=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("window,soft_cap", [(7, None), (300, None), (40, 5.0), (None, 2.0)])
def test_kernel_matches_reference_over_int8(window, soft_cap, dtype) -> None:
    # SmolLM2's heads: under bf16 the int8 cache is read in place where the build can.
    run_both(BATCH, 16, 9, 3, 64, dtype, window, soft_cap, cache_dtype=INT8_KV_DTYPE)
    run_both(SPLIT_BATCH, 16, 9, 3, 64, dtype, window, soft_cap, seed=1, free_before_window=True,
             cache_dtype=INT8_KV_DTYPE)


def test_a_window_changes_the_result() -> None:
    """The comparisons above compare something: a window of 40 over 103 keys differs from
    none, and a soft cap from no cap."""
    gen = torch.Generator().manual_seed(0)
    metadata = build_attention_metadata([3], [103], [list(range(7))], 16)
    cache = torch.randn(2, 7, 16, 2, 32, generator=gen)
    q, k, v = (torch.randn(3, h, 32, generator=gen) * 4 for h in (4, 2, 2))
    plain = CpuPagedAttention(4, 2, 32, 32**-0.5, 16)
    out = plain.forward(q, k, v, cache.clone(), metadata)
    for options in ({"sliding_window": 40}, {"logits_soft_cap": 1.0}):
        other = plain.for_layer(**options).forward(q, k, v, cache.clone(), metadata)
        assert not torch.allclose(out, other, atol=1e-3), options


@pytest.mark.parametrize("dtypes", [(torch.float32, None), (torch.bfloat16, None),
                                    (torch.bfloat16, INT8_KV_DTYPE)],
                         ids=["fp32", "bf16", "bf16-int8kv"])
@pytest.mark.parametrize("window,soft_cap", [(50, None), (300, 5.0)])
def test_windowed_query_bits_do_not_depend_on_how_it_is_computed(window, soft_cap,
                                                                 dtypes) -> None:
    dtype, cache_dtype = dtypes
    target_len, crowd = 600, [3, 40, 300, 1]

    def run(lengths, chunk, decode_from):
        seqs = Sequences(lengths, 9, 3, 64, dtype, 16, seed=0, cache_dtype=cache_dtype)
        seqs.backend = seqs.backend.for_layer(sliding_window=window, logits_soft_cap=soft_cap)
        for work in schedules(lengths, chunk, decode_from):
            seqs.step(work)
        return seqs.out[0]

    with num_threads(2):
        reference = run([target_len], None, None)
        assert not reference.isnan().any()
        for lengths, chunk, decode_from in [([target_len], 7, None), ([target_len], None, 560),
                                            ([target_len] + crowd, 33, None),
                                            ([target_len] + crowd, 64, 560)]:
            got = run(lengths, chunk, decode_from)
            bad = (got != reference).flatten(1).any(1).nonzero().flatten().tolist()
            assert not bad, (lengths, chunk, decode_from, len(bad), bad[:3])
