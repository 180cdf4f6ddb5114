"""The reference paged backend against plain contiguous attention, and the metadata builder.

Scenario: one mixed batch with pure prefills, prefill chunks on top of a cached context and
decode steps, whose blocks are scattered over the cache by a random permutation. The cached
context is written into the paged cache by the test itself; the reference attends over the
same keys/values kept in ordinary contiguous tensors.
"""

from __future__ import annotations

import pytest
import torch

from pagedllm.attention import (
    DEFAULT_ATTENTION_BACKEND,
    AttentionBackend,
    available_attention_backends,
    build_attention_metadata,
    get_attention_backend,
)
from pagedllm.attention.cpu_paged import CpuPagedAttention
from pagedllm.attention.torch_paged import TorchPagedAttention

HEAD_SIZE = 16

# (num_cached_tokens, query_len) per sequence, all in ONE batch.
MIXED_BATCH = [
    (0, 9),  # pure prefill
    (0, 1),  # one-token prompt: prefill and decode at once
    (11, 5),  # prefill chunk on cached context
    (37, 1),  # decode
    (0, 33),  # pure prefill spanning more than one 32-token block
    (64, 1),  # decode that opens a new block (for block sizes 1, 8, 16, 32)
    (20, 12),  # prefill chunk crossing block boundaries
    (3, 1),  # decode
]


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def slot_of(block_table: list[int], position: int, block_size: int) -> int:
    return block_table[position // block_size] * block_size + position % block_size


def reference_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
) -> torch.Tensor:
    """Plain causal attention in float64 for a query chunk at the end of a contiguous context.

    q: [query_len, num_heads, d]; k, v: [seq_len, num_kv_heads, d] -> [query_len, num_heads, d]
    """
    query_len, num_heads = q.shape[0], q.shape[1]
    seq_len, num_kv_heads = k.shape[0], k.shape[1]
    group = num_heads // num_kv_heads
    q, k, v = q.double(), k.double(), v.double()
    k = k.repeat_interleave(group, dim=1)  # [seq_len, num_heads, d]
    v = v.repeat_interleave(group, dim=1)  # [seq_len, num_heads, d]
    scores = torch.einsum("qhd,khd->hqk", q, k) * scale  # [num_heads, query_len, seq_len]
    q_pos = torch.arange(seq_len - query_len, seq_len)  # [query_len]
    k_pos = torch.arange(seq_len)  # [seq_len]
    visible = k_pos[None, :] <= q_pos[:, None]  # [query_len, seq_len]
    scores = scores.masked_fill(~visible, float("-inf"))
    probs = scores.softmax(dim=-1)
    return torch.einsum("hqk,khd->qhd", probs, v)  # [query_len, num_heads, d]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("num_heads,num_kv_heads", [(4, 4), (8, 2)], ids=["mha", "gqa"])
@pytest.mark.parametrize("block_size", [1, 8, 16, 32])
def test_mixed_batch_matches_contiguous_reference(
    block_size: int, num_heads: int, num_kv_heads: int, dtype: torch.dtype
) -> None:
    gen = torch.Generator().manual_seed(1000 * block_size + num_heads)
    scale = HEAD_SIZE**-0.5
    seq_lens = [num_cached + query_len for num_cached, query_len in MIXED_BATCH]
    query_lens = [query_len for _, query_len in MIXED_BATCH]

    # Scatter the blocks: a random permutation of all block ids, 3 of them never used, and
    # sequence 2 gets one spare block beyond its need (pre-allocated room to grow).
    num_blocks_needed = [cdiv(seq_len, block_size) for seq_len in seq_lens]
    num_blocks_needed[2] += 1
    num_blocks = sum(num_blocks_needed) + 3
    perm = torch.randperm(num_blocks, generator=gen).tolist()
    block_tables: list[list[int]] = []
    for n in num_blocks_needed:
        block_tables.append(perm[:n])
        perm = perm[n:]

    # Full (cached + new) K/V per sequence, kept contiguous for the reference.
    full_keys = [torch.randn(s, num_kv_heads, HEAD_SIZE, generator=gen).to(dtype) for s in seq_lens]
    full_values = [
        torch.randn(s, num_kv_heads, HEAD_SIZE, generator=gen).to(dtype) for s in seq_lens
    ]
    queries = [torch.randn(n, num_heads, HEAD_SIZE, generator=gen).to(dtype) for n in query_lens]

    # A cache full of noise, so that reading a wrong slot shows up in the output.
    shape = TorchPagedAttention.kv_cache_shape(num_blocks, block_size, num_kv_heads, HEAD_SIZE)
    kv_cache = torch.randn(shape, generator=gen).to(dtype)
    # Pre-write each sequence's cached context at its slots, one position at a time.
    for (num_cached, _), table, k, v in zip(MIXED_BATCH, block_tables, full_keys, full_values):
        for pos in range(num_cached):
            block_id, offset = table[pos // block_size], pos % block_size
            kv_cache[0, block_id, offset] = k[pos]
            kv_cache[1, block_id, offset] = v[pos]
    cache_before = kv_cache.clone()

    # The new tokens, flattened in batch order.
    query = torch.cat(queries)  # [num_tokens, num_heads, d]
    key = torch.cat([k[nc:] for (nc, _), k in zip(MIXED_BATCH, full_keys)])  # [num_tokens, kv_h, d]
    value = torch.cat([v[nc:] for (nc, _), v in zip(MIXED_BATCH, full_values)])
    metadata = build_attention_metadata(query_lens, seq_lens, block_tables, block_size)

    backend = TorchPagedAttention(num_heads, num_kv_heads, HEAD_SIZE, scale, block_size)
    out = backend.forward(query, key, value, kv_cache, metadata)

    assert out.shape == query.shape and out.dtype == dtype
    atol = rtol = 1e-5 if dtype == torch.float32 else 2e-2
    start = 0
    for i, (q, k, v) in enumerate(zip(queries, full_keys, full_values)):
        expected = reference_attention(q, k, v, scale)
        got = out[start : start + q.shape[0]].double()
        torch.testing.assert_close(got, expected, atol=atol, rtol=rtol, msg=f"sequence {i}")
        start += q.shape[0]

    # The new K/V landed at exactly their slots, and nothing else moved.
    expected_cache = cache_before.clone()
    new_slots: set[int] = set()
    for (num_cached, _), table, k, v in zip(MIXED_BATCH, block_tables, full_keys, full_values):
        for pos in range(num_cached, k.shape[0]):
            block_id, offset = table[pos // block_size], pos % block_size
            expected_cache[0, block_id, offset] = k[pos]
            expected_cache[1, block_id, offset] = v[pos]
            new_slots.add(slot_of(table, pos, block_size))
    assert torch.equal(kv_cache, expected_cache)
    changed = (kv_cache != cache_before).flatten(3).any(-1).any(0).flatten()  # [num_slots]
    assert set(torch.nonzero(changed).flatten().tolist()) == new_slots


def test_build_attention_metadata_exact_slots() -> None:
    # block_size 4. Seq 0: 3 cached + 3 new (positions 3..5) over blocks [7, 2].
    # Seq 1: decode at position 8, third block of [5, 0, 3, 8] (8 is a spare, not needed).
    # Seq 2: fresh 2-token prompt in block 1.
    metadata = build_attention_metadata(
        query_lens=[3, 1, 2],
        seq_lens=[6, 9, 2],
        block_tables=[[7, 2], [5, 0, 3, 8], [1]],
        block_size=4,
    )
    assert metadata.num_seqs == 3 and metadata.num_tokens == 6
    assert metadata.query_start_loc.tolist() == [0, 3, 4, 6]
    assert metadata.seq_lens.tolist() == [6, 9, 2]
    # pos 3 -> 7*4+3, pos 4 -> 2*4+0, pos 5 -> 2*4+1 | pos 8 -> 3*4+0 | pos 0, 1 -> 1*4+{0,1}
    assert metadata.slot_mapping.tolist() == [31, 8, 9, 12, 4, 5]
    assert metadata.block_tables.tolist() == [[7, 2, 0], [5, 0, 3], [1, 0, 0]]
    assert metadata.query_start_loc.dtype == torch.int64
    assert metadata.seq_lens.dtype == torch.int64
    assert metadata.slot_mapping.dtype == torch.int64
    assert metadata.block_tables.dtype == torch.int32
    assert metadata.query_lens_cpu == [3, 1, 2]
    assert metadata.seq_lens_cpu == [6, 9, 2]
    assert metadata.max_query_len == 3 and metadata.max_seq_len == 9


def test_build_attention_metadata_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="needs 2"):
        build_attention_metadata([1], [5], [[3]], block_size=4)
    with pytest.raises(ValueError, match="query_len"):
        build_attention_metadata([6], [5], [[3, 4]], block_size=4)
    with pytest.raises(ValueError, match="one entry per sequence"):
        build_attention_metadata([1, 1], [5], [[3, 4]], block_size=4)


def test_registry_resolves_known_and_rejects_unknown() -> None:
    assert DEFAULT_ATTENTION_BACKEND in available_attention_backends()
    backend_cls = get_attention_backend(DEFAULT_ATTENTION_BACKEND)
    assert backend_cls is CpuPagedAttention  # the fused kernel is the default
    assert issubclass(backend_cls, AttentionBackend) and backend_cls.name == "cpu_paged"
    assert get_attention_backend("torch_paged") is TorchPagedAttention
    with pytest.raises(ValueError, match="Unknown attention backend 'nope'.*torch_paged"):
        get_attention_backend("nope")
