"""The fused attention kernel gives a query the same bits however its sequence is computed.

A sequence of random queries, keys and values is attended as one prefill, alone in its step;
that is the reference. Then the same tokens go through the kernel
  - in prefill chunks of several sizes (the keys before each chunk come from the cache),
  - as decode steps, one token per step,
  - among other sequences (prefills, chunks, decodes), so that the kernel plans other work items
    (one sequence alone over a long context has its keys split over the threads; in a crowd it
    is not split),
and every output row must equal the reference's bit for bit; with the model's dtype as the cache's
and with 8-bit ones (kv_cache_dtype="int8", "fp8").
"""

from __future__ import annotations

import pytest
import torch
from torch_threads import num_threads

from pagedllm.attention import build_attention_metadata
from pagedllm.attention.cpu_paged import CpuPagedAttention
from pagedllm.attention.torch_paged import quantize_int8_rows
from pagedllm.ops import cpu_extension


@pytest.fixture(scope="module", autouse=True)
def kernel() -> None:
    if cpu_extension.cpu_ops() is None:
        pytest.skip(f"cpu_paged kernel unavailable: {cpu_extension.cpu_ops_error()}")


class Sequences:
    """Random q/k/v for sequences of given lengths, and a paged cache to run them through."""

    def __init__(self, lengths: list[int], num_heads: int, num_kv_heads: int, head_size: int,
                 dtype: torch.dtype, block_size: int, seed: int,
                 cache_dtype: torch.dtype | None = None) -> None:
        self.lengths = lengths
        self.q, self.k, self.v = [], [], []
        for s, n in enumerate(lengths):  # sequence s's tokens depend on s and n alone
            gen = torch.Generator().manual_seed(1000 * s + n)
            self.q.append(torch.randn(n, num_heads, head_size, generator=gen).to(dtype))
            self.k.append(torch.randn(n, num_kv_heads, head_size, generator=gen).to(dtype))
            self.v.append(torch.randn(n, num_kv_heads, head_size, generator=gen).to(dtype))
        gen = torch.Generator().manual_seed(seed)
        self.block_size = block_size
        blocks = [-(-n // block_size) for n in lengths]
        # Scattered blocks, a different permutation per seed.
        perm = torch.randperm(sum(blocks) + 2, generator=gen).tolist()
        self.tables = []
        for n in blocks:
            self.tables.append(perm[:n])
            perm = perm[n:]
        self.cache = torch.randn(2, sum(blocks) + 2, block_size, num_kv_heads, head_size,
                                 generator=gen).to(cache_dtype or dtype)
        if cache_dtype == torch.int8:  # rows of values and their scale
            self.cache = quantize_int8_rows(torch.randn(2, sum(blocks) + 2, block_size,
                                                        num_kv_heads, head_size, generator=gen))
        self.backend = CpuPagedAttention(num_heads, num_kv_heads, head_size, head_size**-0.5,
                                         block_size)
        self.out = [torch.full_like(q, float("nan")) for q in self.q]

    def step(self, work: list[tuple[int, int, int]]) -> None:
        """One kernel call over (sequence, first token, number of tokens) of each sequence."""
        metadata = build_attention_metadata(
            [n for _, _, n in work], [start + n for _, start, n in work],
            [self.tables[s] for s, _, _ in work], self.block_size)

        def pick(tensors: list[torch.Tensor]) -> torch.Tensor:
            return torch.cat([tensors[s][start:start + n] for s, start, n in work])

        out = self.backend.forward(pick(self.q), pick(self.k), pick(self.v), self.cache, metadata)
        row = 0
        for s, start, n in work:
            self.out[s][start:start + n] = out[row:row + n]
            row += n


def schedules(lengths: list[int], chunk: int | None, decode_from: int | None):
    """Steps that compute every sequence: in chunks of `chunk` tokens (None: whole), the tokens
    from `decode_from` on one per step; all sequences advance together in each step."""
    done = [0] * len(lengths)
    while any(d < n for d, n in zip(done, lengths)):
        work = []
        for s, n in enumerate(lengths):
            if done[s] >= n:
                continue
            limit = n if decode_from is None else max(decode_from, done[s] + 1)
            size = min(limit, n) - done[s]
            if chunk is not None:
                size = min(size, chunk)
            work.append((s, done[s], size))
            done[s] += size
        yield work


# (num_heads, num_kv_heads, head_size, block_size): SmolLM2's heads, also over blocks of 5
# (key tiles straddle blocks); MHA; MQA with 128; head size 20 (scalar tails); 9 query heads
# per kv head (past the decode kernels' group sizes).
SHAPES = [(9, 3, 64, 16), (9, 3, 64, 5), (4, 4, 32, 16), (8, 1, 128, 16), (6, 2, 20, 16),
          (18, 2, 64, 16)]
SHAPE_IDS = ["gqa-smollm2", "gqa-smollm2-block5", "mha-32", "mqa-128", "gqa-head20", "group9"]


# (query dtype, cache dtype): the model's dtype, and 8-bit caches (the fp8 one under bf16: over
# fp32 its paths are the fp32 cache's, test_kv_cache_8bit.py).
DTYPES = [(torch.float32, None), (torch.bfloat16, None), (torch.bfloat16, torch.float8_e5m2),
          (torch.float32, torch.int8), (torch.bfloat16, torch.int8)]
DTYPE_IDS = ["fp32", "bf16", "bf16-fp8kv", "fp32-int8kv", "bf16-int8kv"]


@pytest.mark.parametrize("dtypes", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_query_output_does_not_depend_on_how_its_sequence_is_computed(shape, dtypes) -> None:
    dtype, cache_dtype = dtypes
    num_heads, num_kv_heads, head_size, block_size = shape
    target_len = 600  # past two 256-key segments: its keys are split over threads when alone
    crowd = [3, 40, 300, 1, 129]

    def run(lengths, chunk, decode_from, seed=0):
        seqs = Sequences(lengths, num_heads, num_kv_heads, head_size, dtype, block_size, seed,
                         cache_dtype)
        for work in schedules(lengths, chunk, decode_from):
            seqs.step(work)
        return seqs.out[0]

    with num_threads(2):
        reference = run([target_len], None, None)
        assert not reference.isnan().any()
        arrangements = {
            "chunks of 7": ([target_len], 7, None),
            "chunks of 100": ([target_len], 100, None),
            "decode after 560": ([target_len], None, 560),
            "in a crowd": ([target_len] + crowd, None, None),
            "chunks of 33 in a crowd": ([target_len] + crowd, 33, None),
            "decode after 560 in a crowd": ([target_len] + crowd, 64, 560),
        }
        failures = []
        for name, (lengths, chunk, decode_from) in arrangements.items():
            got = run(lengths, chunk, decode_from)
            bad = (got != reference).flatten(1).any(1).nonzero().flatten().tolist()
            if bad:
                failures.append(f"{name}: {len(bad)} tokens differ, first at position {bad[0]}")
        # Three threads: other splits of the keys.
        with num_threads(3):
            got = run([target_len], None, 560)
        bad = (got != reference).flatten(1).any(1).nonzero().flatten().tolist()
        if bad:
            failures.append(f"3 threads: {len(bad)} tokens differ, first at position {bad[0]}")
    assert not failures, "\n".join(failures)
