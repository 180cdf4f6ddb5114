"""The fused CPU kernel (`cpu_paged`) against the reference backend (`torch_paged`).

Scenario: one ragged batch mixing pure prefills, prefill chunks on top of a cached context and
decode steps, whose blocks are scattered over a noise-filled cache by a random permutation.
Both backends run on identical copies of the cache; outputs and the whole cache after the
K/V writes must agree. The first run in a fresh cache directory compiles the kernel (~20 s on
2 cores); later runs load the cached library.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch_threads import num_threads

from pagedllm.attention import build_attention_metadata, get_attention_backend
from pagedllm.attention.cpu_paged import CpuPagedAttention
from pagedllm.attention.torch_paged import TorchPagedAttention
from pagedllm.ops import cpu_extension

# (num_cached_tokens, query_len) per sequence, all in ONE batch.
MIXED_BATCH = [
    (0, 9),  # pure prefill
    (0, 1),  # one-token prompt: prefill and decode at once
    (11, 5),  # prefill chunk on cached context
    (37, 1),  # decode
    (0, 70),  # pure prefill over several query tiles and 32-token blocks
    (64, 1),  # decode that opens a new block (for block sizes 1, 8, 16, 32)
    (20, 12),  # prefill chunk crossing block boundaries
    (3, 1),  # decode
    (300, 1),  # long decode
    (130, 40),  # long chunk: several query tiles over a long context
]
# Few long sequences: fewer work items than ~2 per thread make the kernel split key ranges
# (with 4 threads: 1 item for the decode, 3 for the chunk, one per kv head).
SMALL_BATCH = [(1500, 1), (700, 17)]


@pytest.fixture(scope="module")
def kernel() -> None:
    if cpu_extension.cpu_ops() is None:
        pytest.skip(f"cpu_paged kernel unavailable: {cpu_extension.cpu_ops_error()}")


# The tests of the kernel itself; the registry and fallback tests below run without it.
needs_kernel = pytest.mark.usefixtures("kernel")


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def run_both(
    batch: list[tuple[int, int]],
    block_size: int,
    num_heads: int,
    num_kv_heads: int,
    head_size: int,
    dtype: torch.dtype,
    seed: int,
) -> None:
    gen = torch.Generator().manual_seed(seed)
    seq_lens = [num_cached + query_len for num_cached, query_len in batch]
    query_lens = [query_len for _, query_len in batch]
    # Scattered blocks: a random permutation of all ids, with 3 ids never used.
    num_blocks_needed = [cdiv(seq_len, block_size) for seq_len in seq_lens]
    num_blocks = sum(num_blocks_needed) + 3
    perm = torch.randperm(num_blocks, generator=gen).tolist()
    block_tables: list[list[int]] = []
    for n in num_blocks_needed:
        block_tables.append(perm[:n])
        perm = perm[n:]
    metadata = build_attention_metadata(query_lens, seq_lens, block_tables, block_size)

    # A cache full of noise stands in for the cached context (and catches reads of wrong slots).
    shape = TorchPagedAttention.kv_cache_shape(num_blocks, block_size, num_kv_heads, head_size)
    kv_cache = torch.randn(shape, generator=gen).to(dtype)
    num_tokens = sum(query_lens)
    query = torch.randn(num_tokens, num_heads, head_size, generator=gen).to(dtype)
    key = torch.randn(num_tokens, num_kv_heads, head_size, generator=gen).to(dtype)
    value = torch.randn(num_tokens, num_kv_heads, head_size, generator=gen).to(dtype)

    scale = head_size**-0.5
    args = (num_heads, num_kv_heads, head_size, scale, block_size)
    ref_cache, kernel_cache = kv_cache.clone(), kv_cache.clone()
    expected = TorchPagedAttention(*args).forward(query, key, value, ref_cache, metadata)
    got = CpuPagedAttention(*args).forward(query, key, value, kernel_cache, metadata)

    assert got.shape == query.shape and got.dtype == dtype
    # The K/V writes are plain copies: bit-exact, and only at the new tokens' slots.
    assert torch.equal(kernel_cache, ref_cache)
    atol = rtol = 1e-5 if dtype == torch.float32 else 2e-2
    # Token rows -> sequence index, to name the first sequence that disagrees.
    seq_of_token = torch.repeat_interleave(torch.arange(len(batch)), torch.tensor(query_lens))
    bad = ~torch.isclose(got.float(), expected.float(), atol=atol, rtol=rtol).flatten(1).all(1)
    if bad.any():
        i = int(seq_of_token[bad.nonzero()[0, 0]])
        start = sum(query_lens[:i])
        torch.testing.assert_close(
            got[start : start + query_lens[i]].float(),
            expected[start : start + query_lens[i]].float(),
            atol=atol,
            rtol=rtol,
            msg=lambda m: f"sequence {i} {batch[i]}: {m}",
        )


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(
    "num_heads,num_kv_heads,head_size",
    [(9, 3, 64), (4, 4, 32), (8, 1, 128), (6, 2, 20), (6, 2, 96), (2, 1, 160)],
    # head 20 is no multiple of the SIMD width: it takes the scalar tails. Heads 96 and 160: the
    # bf16 dot-product items' p @ V in 3 chunks, and in 4 + 1.
    ids=["gqa-smollm2", "mha-32", "mqa-128", "gqa-head20", "gqa-head96", "gqa-head160"],
)
@pytest.mark.parametrize("block_size", [1, 8, 16, 32])
def test_mixed_batch_matches_reference(
    block_size: int, num_heads: int, num_kv_heads: int, head_size: int, dtype: torch.dtype
) -> None:
    run_both(MIXED_BATCH, block_size, num_heads, num_kv_heads, head_size, dtype, seed=block_size)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("block_size", [5, 16])
def test_split_keys_match_reference(block_size: int, dtype: torch.dtype) -> None:
    # Odd block size 5 too: key tiles of the kernel straddle blocks.
    with num_threads(4):
        run_both(SMALL_BATCH, block_size, 9, 3, 64, dtype, seed=7)


# Decode steps only, over contexts that end mid-tile, on block boundaries and past several tiles.
DECODE_BATCH = [(0, 1), (15, 1), (31, 1), (32, 1), (100, 1), (257, 1), (600, 1)]


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("group", [1, 2, 3, 4, 5, 6, 7, 8, 9])
def test_decode_every_group_size_matches_reference(group: int, dtype: torch.dtype) -> None:
    # The decode path is compiled per group size (query heads per kv head) up to 8; 9 takes the
    # general path. Head size 72: whole SIMD vectors plus a register chunk that does not divide.
    run_both(DECODE_BATCH, 16, 2 * group, 2, 72, dtype, seed=group)
    # Head size 20: scalar tails.
    run_both(DECODE_BATCH[:4], 8, group, 1, 20, dtype, seed=group)
    # Head sizes 64, 128 and 96 (multiples of 32): in bf16 on AVX512_BF16 CPUs, the dot-product
    # decode, compiled for 64 and 128 and general for the others, whose p @ V passes take
    # 32-value chunks a few at a time (a pass of fewer when they do not divide).
    run_both(DECODE_BATCH, 16, 3 * group, 3, 64, dtype, seed=group)
    run_both(DECODE_BATCH[:4], 16, 2 * group, 2, 128, dtype, seed=group)
    run_both(DECODE_BATCH, 8, group, 1, 96, dtype, seed=group)


@needs_kernel
@pytest.mark.parametrize("threads", [1, 3])
def test_thread_count_does_not_change_results(threads: int) -> None:
    with num_threads(threads):
        run_both(SMALL_BATCH + MIXED_BATCH, 16, 9, 3, 64, torch.float32, seed=3)


@needs_kernel
def test_kv_writes_land_in_their_slots() -> None:
    # block_size 4. Seq 0: 3 cached + 3 new (positions 3..5) over blocks [7, 2] -> slots 31, 8, 9.
    # Seq 1: decode at position 8, third block of [5, 0, 3] -> slot 12.
    metadata = build_attention_metadata([3, 1], [6, 9], [[7, 2], [5, 0, 3]], block_size=4)
    kv_cache = torch.zeros(2, 8, 4, 2, 16)
    key = torch.arange(1, 5).float()[:, None, None].expand(4, 2, 16)  # token i -> value i + 1
    value = -key
    query = torch.randn(4, 4, 16)
    CpuPagedAttention(4, 2, 16, 0.25, 4).forward(query, key, value, kv_cache, metadata)
    flat = kv_cache.view(2, 32, 2, 16)
    for token, slot in enumerate([31, 8, 9, 12]):
        assert torch.equal(flat[0, slot], key[token]) and torch.equal(flat[1, slot], value[token])
    written = flat.flatten(2).abs().sum(-1).sum(0).nonzero().flatten().tolist()
    assert written == [8, 9, 12, 31]


@needs_kernel
def test_non_contiguous_inputs_and_bf16_query_over_fp32_cache() -> None:
    # q/k/v as views into one fused projection output, as a model produces them.
    gen = torch.Generator().manual_seed(0)
    metadata = build_attention_metadata([5, 1], [12, 30], [[3, 0], [1, 4]], block_size=16)
    qkv = torch.randn(6, 9 + 3 + 3, 64, generator=gen)
    query, key, value = qkv.split([9, 3, 3], dim=1)
    kv_cache = torch.randn(2, 5, 16, 3, 64, generator=gen)
    ref_cache, kernel_cache = kv_cache.clone(), kv_cache.clone()
    args = (9, 3, 64, 0.125, 16)
    expected = TorchPagedAttention(*args).forward(query, key, value, ref_cache, metadata)
    got = CpuPagedAttention(*args).forward(query, key, value, kernel_cache, metadata)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(kernel_cache, ref_cache)
    # A bf16 query over an fp32 cache: output in bf16.
    got_bf16 = CpuPagedAttention(*args).forward(
        query.bfloat16(), key, value, kv_cache.clone(), metadata
    )
    assert got_bf16.dtype == torch.bfloat16
    torch.testing.assert_close(got_bf16.float(), expected, atol=2e-2, rtol=2e-2)


@needs_kernel
def test_bad_slot_raises_instead_of_writing_out_of_bounds() -> None:
    metadata = build_attention_metadata([1], [1], [[0]], block_size=4)
    metadata.slot_mapping[0] = 4 * 2  # one past the last slot of a 2-block cache
    kv_cache = torch.zeros(2, 2, 4, 1, 8)
    x = torch.randn(1, 1, 8)
    with pytest.raises(RuntimeError, match="outside the cache"):
        CpuPagedAttention(1, 1, 8, 1.0, 4).forward(x, x, x, kv_cache, metadata)


def test_registry_knows_cpu_paged() -> None:
    assert get_attention_backend("cpu_paged") is CpuPagedAttention


def test_a_failed_build_is_not_retried(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PAGEDLLM_CACHE_DIR", str(tmp_path))
    build_dir = cpu_extension.build_directory()
    build_dir.mkdir(parents=True)
    (build_dir / "BUILD_FAILED").write_text("CalledProcessError: g++ exited 1\n")
    with pytest.raises(RuntimeError, match="earlier build failed.*delete it to retry"):
        cpu_extension._build_or_load()


def test_falls_back_to_reference_when_the_build_fails(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken_build() -> None:
        raise RuntimeError("no compiler here")

    monkeypatch.delenv(cpu_extension.DISABLE_ENV, raising=False)
    monkeypatch.setattr(cpu_extension, "_build_or_load", broken_build)
    monkeypatch.setattr(cpu_extension, "_load_attempted", False)
    monkeypatch.setattr(cpu_extension, "_ops", None)
    monkeypatch.setattr(cpu_extension, "_load_error", None)
    metadata = build_attention_metadata([3], [3], [[1]], block_size=8)
    x = torch.randn(3, 2, 16)
    args = (2, 2, 16, 0.25, 8)
    kv_cache = torch.zeros(2, 2, 8, 2, 16)
    with caplog.at_level("WARNING", logger="pagedllm.ops.cpu_extension"):
        got = CpuPagedAttention(*args).forward(x, x, x, kv_cache, metadata)
        CpuPagedAttention(*args).forward(x, x, x, kv_cache.clone(), metadata)
    expected = TorchPagedAttention(*args).forward(x, x, x, torch.zeros_like(kv_cache), metadata)
    torch.testing.assert_close(got, expected)
    assert len(caplog.records) == 1  # warned once, not once per call
    assert "no compiler here" in caplog.records[0].message
    assert cpu_extension.cpu_ops_error() == "RuntimeError: no compiler here"
