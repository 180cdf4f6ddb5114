"""The 8-bit KV caches, kv_cache_dtype="int8" (int8 rows with an fp32 scale per token and kv
head) and "fp8" (e5m2): the kernel's writes give the reference's bytes, each path that widens an
8-bit cache gives the bits it gives over a cache of the query's dtype holding the dequantized
values, the int8 cache read in place (bf16 query, AVX512_VNNI builds) is nearer the exact
attention over those values than that, and the kernel agrees with the torch_paged reference.
"""

from __future__ import annotations

import pytest
import torch
from torch_threads import num_threads

from pagedllm.attention import build_attention_metadata
from pagedllm.attention.cpu_paged import (
    CpuPagedAttention,
    int8_kv_read_in_place,
    kernel_applies,
)
from pagedllm.attention.torch_paged import (
    FP8_KV_DTYPE,
    INT8_KV_DTYPE,
    TorchPagedAttention,
    dequantize_int8_rows,
    kv_cache_row_size,
    quantize_int8_rows,
    quantize_kv,
)
from pagedllm.ops import cpu_extension

# (num_cached_tokens, query_len) per sequence, in one batch: prefills, chunks over a context,
# decodes, a long decode (split keys with several threads) and a long chunk.
BATCH = [(0, 9), (0, 1), (11, 5), (37, 1), (0, 70), (64, 1), (20, 12), (300, 1), (130, 40)]
SHAPES = [(9, 3, 64), (4, 4, 32), (8, 1, 128), (6, 2, 20), (6, 2, 96)]
SHAPE_IDS = ["gqa-smollm2", "mha-32", "mqa-128", "gqa-head20", "gqa-head96"]


@pytest.fixture(scope="module")
def kernel() -> None:
    if cpu_extension.cpu_ops() is None:
        pytest.skip(f"cpu_paged kernel unavailable: {cpu_extension.cpu_ops_error()}")


needs_kernel = pytest.mark.usefixtures("kernel")


def finite_fp8_bytes(shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    """Random e5m2 bytes over every finite value (all signs, subnormals, up to 57344)."""
    raw = torch.randint(0, 256, shape, generator=gen, dtype=torch.uint8)
    mag = raw & 0x7F
    raw = torch.where(mag >= 0x7C, raw & 0x83, raw)  # inf/nan -> subnormal of the same sign
    return raw.view(FP8_KV_DTYPE)


KINDS = [INT8_KV_DTYPE, FP8_KV_DTYPE]
KIND_IDS = ["int8", "fp8"]


def quantize(x: torch.Tensor, kind: torch.dtype) -> torch.Tensor:
    """x as the cache of `kind` stores it (int8: rows with their scale)."""
    return quantize_int8_rows(x) if kind == INT8_KV_DTYPE else quantize_kv(x, kind)


def dequantize(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return dequantize_int8_rows(x, dtype) if x.dtype == INT8_KV_DTYPE else x.to(dtype)


def raw(cache: torch.Tensor) -> torch.Tensor:
    return cache.view(torch.uint8)


def batch_inputs(batch, block_size, num_heads, num_kv_heads, head_size, dtype, seed,
                 kind=None):
    gen = torch.Generator().manual_seed(seed)
    seq_lens = [c + q for c, q in batch]
    query_lens = [q for _, q in batch]
    needed = [-(-n // block_size) for n in seq_lens]
    perm = torch.randperm(sum(needed) + 3, generator=gen).tolist()
    tables = []
    for n in needed:
        tables.append(perm[:n])
        perm = perm[n:]
    metadata = build_attention_metadata(query_lens, seq_lens, tables, block_size)
    row = head_size if kind is None else kv_cache_row_size(head_size, kind)
    shape = TorchPagedAttention.kv_cache_shape(sum(needed) + 3, block_size, num_kv_heads, row)
    num_tokens = sum(query_lens)
    query = torch.randn(num_tokens, num_heads, head_size, generator=gen).to(dtype)
    key = torch.randn(num_tokens, num_kv_heads, head_size, generator=gen).to(dtype)
    value = torch.randn(num_tokens, num_kv_heads, head_size, generator=gen).to(dtype)
    return metadata, shape, query, key, value, gen


def test_quantize_kv_saturates_and_rounds_to_nearest_even() -> None:
    x = torch.tensor([1e9, -1e9, 61440.0, 57344.0, 1.125, 1.375, 2.0**-17, 3 * 2.0**-17, 0.0])
    got = quantize_kv(x, FP8_KV_DTYPE).float().tolist()
    # 1.125 is halfway between 1.0 and 1.25 (ties to the even 1.0); 1.375 -> 1.5 (even).
    assert got == [57344.0, -57344.0, 57344.0, 57344.0, 1.0, 1.5, 0.0, 2.0**-15, 0.0]


def test_int8_rows_round_to_nearest_even_with_their_scale() -> None:
    x = torch.tensor([[127.0, 0.5, -1.5, 2.5, -127.0], [0.0] * 5])
    rows = quantize_int8_rows(x)
    assert rows.shape == (2, 9) and rows.dtype == INT8_KV_DTYPE
    assert rows[0, :5].tolist() == [127, 0, -2, 2, -127]  # scale 1: ties to even
    assert rows[1, :5].tolist() == [0] * 5
    assert dequantize_int8_rows(rows, torch.float32).tolist() == [
        [127.0, 0.0, -2.0, 2.0, -127.0], [0.0] * 5]


@needs_kernel
@pytest.mark.parametrize("kind", KINDS, ids=KIND_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_kernel_writes_the_bytes_the_reference_writes(dtype: torch.dtype,
                                                      kind: torch.dtype) -> None:
    # Every finite bf16 value (and, for fp32, values between them, ties included) as keys and
    # values of 64 tokens x 4 heads x 256: the cache bytes of the kernel and of torch agree.
    bits = torch.arange(65536, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    values = bits[torch.isfinite(bits.float())].float()
    if dtype == torch.float32:
        gen = torch.Generator().manual_seed(0)
        values = values * (1 + torch.rand(values.shape, generator=gen) / 4)
        values[:64] = torch.tensor([1.125, 1.375, 2.0**-17, 3 * 2.0**-17] * 16)  # exact ties
    num_tokens = values.numel() // (4 * 256)
    key = values[: num_tokens * 1024].reshape(num_tokens, 4, 256).to(dtype)
    value = key.flip(0)
    block_size = 16
    num_blocks = -(-num_tokens // block_size)
    shape = TorchPagedAttention.kv_cache_shape(num_blocks, block_size, 4,
                                               kv_cache_row_size(256, kind))
    metadata = build_attention_metadata([num_tokens], [num_tokens],
                                        [list(range(num_blocks))[::-1]], block_size)
    args = (4, 4, 256, 1.0 / 16, block_size)
    query = torch.zeros(num_tokens, 4, 256, dtype=dtype)
    ref = torch.zeros(shape, dtype=kind)
    got = torch.zeros(shape, dtype=kind)
    TorchPagedAttention(*args).write_kv(key, value, ref, metadata.slot_mapping)
    CpuPagedAttention(*args).forward(query, key, value, got, metadata)
    assert torch.equal(raw(got), raw(ref))


@needs_kernel
@pytest.mark.parametrize("kind", KINDS, ids=KIND_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("num_heads,num_kv_heads,head_size", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("block_size", [5, 16])
@pytest.mark.parametrize("threads", [1, 3])
def test_kernel_over_8bit_is_the_kernel_over_the_dequantized_cache(
    threads: int, block_size: int, num_heads: int, num_kv_heads: int, head_size: int,
    dtype: torch.dtype, kind: torch.dtype,
) -> None:
    if kind == INT8_KV_DTYPE and dtype == torch.bfloat16 and int8_kv_read_in_place(head_size):
        pytest.skip("read in place: test_int8_read_in_place_is_nearer_the_exact_attention")
    metadata, shape, query, key, value, gen = batch_inputs(
        BATCH, block_size, num_heads, num_kv_heads, head_size, dtype, seed=block_size, kind=kind)
    cache8 = torch.empty(shape, dtype=kind)
    if kind == FP8_KV_DTYPE:
        # Keys of a normal size (scores in a useful range), values over every finite byte.
        cache8[0] = quantize_kv(torch.randn(shape[1:], generator=gen), FP8_KV_DTYPE)
        cache8[1] = finite_fp8_bytes(shape[1:], gen)
    else:  # rows of every int8 value, scales of several sizes
        values = torch.randn(*shape[:-1], head_size, generator=gen)
        values *= torch.rand(*shape[:-1], 1, generator=gen) * 4
        cache8.copy_(quantize_int8_rows(values))
    cache16 = dequantize(cache8, dtype)  # what the paths of the query's dtype read
    args = (num_heads, num_kv_heads, head_size, head_size**-0.5, block_size)
    backend = CpuPagedAttention(*args)
    assert kernel_applies(query, key, value, cache8)
    with num_threads(threads):
        got = backend.forward(query, key, value, cache8, metadata)
        expected = backend.forward(query, dequantize(quantize(key, kind), dtype),
                                   dequantize(quantize(value, kind), dtype), cache16, metadata)
    assert torch.equal(dequantize(cache8, dtype), cache16)  # the writes, dequantized
    assert torch.equal(got, expected)  # bit for bit (NaN-free: finite values only)


def exact_attention(query: torch.Tensor, cache: torch.Tensor, metadata, num_kv_heads: int,
                    scale: float) -> torch.Tensor:
    """Causal attention in fp64 over the cache's values (int8: dequantized), per sequence."""
    keys, values = (dequantize(half, torch.float64) for half in cache)
    group = query.shape[1] // num_kv_heads
    block_size = cache.shape[2]
    out = torch.empty(query.shape, dtype=torch.float64)
    start = 0
    for i, (query_len, seq_len) in enumerate(zip(metadata.query_lens_cpu,
                                                 metadata.seq_lens_cpu)):
        ids = metadata.block_tables[i, : -(-seq_len // block_size)]
        k, v = (x.index_select(0, ids).flatten(0, 1)[:seq_len].repeat_interleave(group, 1)
                for x in (keys, values))  # [seq_len, num_heads, d]
        q = query[start:start + query_len].double()
        scores = torch.einsum("qhd,khd->hqk", q, k) * scale
        q_pos = torch.arange(seq_len - query_len, seq_len)[:, None]
        scores = scores.masked_fill(torch.arange(seq_len)[None] > q_pos, float("-inf"))
        out[start:start + query_len] = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)
        start += query_len
    return out


@needs_kernel
@pytest.mark.parametrize("num_heads,num_kv_heads,head_size", SHAPES, ids=SHAPE_IDS)
def test_int8_read_in_place_is_nearer_the_exact_attention(num_heads: int, num_kv_heads: int,
                                                          head_size: int) -> None:
    # In place, the int8 values enter integer dot products exactly (the query rounded to 16
    # bits per row, the weights p * v_scale to 16 bits per tile); the widening path rounds
    # each dequantized value and the weights p to bf16. Against the exact attention over the
    # dequantized values, in place must be the nearer, in the mean and at the worst row.
    if not int8_kv_read_in_place(head_size):
        pytest.skip(f"this build dequantizes an int8 cache of head size {head_size}")
    metadata, shape, query, key, value, gen = batch_inputs(
        BATCH, 16, num_heads, num_kv_heads, head_size, torch.bfloat16, seed=3,
        kind=INT8_KV_DTYPE)
    values = torch.randn(*shape[:-1], head_size, generator=gen)
    cache8 = quantize_int8_rows(values * torch.rand(*shape[:-1], 1, generator=gen) * 4)
    backend = CpuPagedAttention(num_heads, num_kv_heads, head_size, head_size**-0.5, 16)
    written = cache8.clone()
    got = backend.forward(query, key, value, written, metadata)
    widened = backend.forward(query, dequantize(quantize_int8_rows(key), torch.bfloat16),
                              dequantize(quantize_int8_rows(value), torch.bfloat16),
                              dequantize(cache8, torch.bfloat16), metadata)
    exact = exact_attention(query, written, metadata, num_kv_heads, head_size**-0.5)
    in_place_err = (got.double() - exact).abs()
    widened_err = (widened.double() - exact).abs()
    assert in_place_err.mean() < widened_err.mean()
    assert in_place_err.max() <= widened_err.max()


@needs_kernel
@pytest.mark.parametrize("kind", KINDS, ids=KIND_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("num_heads,num_kv_heads,head_size", SHAPES, ids=SHAPE_IDS)
def test_kernel_matches_reference_over_8bit(num_heads: int, num_kv_heads: int, head_size: int,
                                            dtype: torch.dtype, kind: torch.dtype) -> None:
    metadata, shape, query, key, value, gen = batch_inputs(
        BATCH, 16, num_heads, num_kv_heads, head_size, dtype, seed=3, kind=kind)
    cache = quantize(torch.randn(*shape[:-1], head_size, generator=gen), kind)
    args = (num_heads, num_kv_heads, head_size, head_size**-0.5, 16)
    ref_cache, kernel_cache = cache.clone(), cache.clone()
    expected = TorchPagedAttention(*args).forward(query, key, value, ref_cache, metadata)
    got = CpuPagedAttention(*args).forward(query, key, value, kernel_cache, metadata)
    assert torch.equal(raw(kernel_cache), raw(ref_cache))
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.float(), expected.float(), atol=tol, rtol=tol)


@needs_kernel
def test_kernel_refuses_8bit_keys() -> None:
    metadata, shape, query, key, value, _ = batch_inputs([(0, 3)], 16, 4, 4, 32,
                                                         torch.bfloat16, seed=0)
    cache = torch.zeros(shape, dtype=FP8_KV_DTYPE)
    key8, value8 = quantize_kv(key, FP8_KV_DTYPE), quantize_kv(value, FP8_KV_DTYPE)
    assert not kernel_applies(query, key8, value8, cache)
    ops = cpu_extension.cpu_ops()
    with pytest.raises(RuntimeError, match="float32 or bfloat16 for a float8_e5m2 or int8"):
        ops.paged_attention(torch.empty_like(query), query, key8, value8, cache,
                            metadata.slot_mapping, metadata.query_start_loc, metadata.seq_lens,
                            metadata.block_tables.to(torch.int32), 0.2)
