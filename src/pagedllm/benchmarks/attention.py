"""Attention kernels on the same data: cpu_paged vs torch_paged vs contiguous SDPA.

SmolLM2 shapes (9 query heads, 3 kv heads, head 64), block size 16, blocks of each sequence
scattered over the cache by a random permutation; the cache is allocated as the engine's CPU
worker allocates it (in transparent huge pages). The paged backends also write the step's new
K/V into their slots, as in the engine; SDPA gets K/V already contiguous per sequence, batched
as [B, H, L, D] with enable_gqa. Achieved GB/s counts the K/V bytes each call must read, against
the memory bandwidth measured in the same run (best of a large tensor sum and copy).

    python -m pagedllm.benchmarks.attention            # full grid, ~3 minutes on 2 cores
    python -m pagedllm.benchmarks.attention --quick    # a few points
    python -m pagedllm.benchmarks.attention --kv-pools # decode steps over 30 layers' pools

--kv-pools times what a decode step of the engine runs: a bf16 query of 64 sequences over 30
layers' pools (one call per layer, each pool its own scattered blocks, so that the K/V come from
memory as in the engine), per KV cache dtype (bf16, int8, fp8), the dtypes alternating round by
round in one process.

Writes benchmarks/results/attention.json (--kv-pools: attention_kv_pools.json) under the
working directory unless --out names a file.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from pagedllm.attention import build_attention_metadata
from pagedllm.attention.cpu_paged import CpuPagedAttention
from pagedllm.attention.torch_paged import (
    FP8_KV_DTYPE,
    INT8_KV_DTYPE,
    TorchPagedAttention,
    kv_cache_row_size,
    quantize_int8_rows,
    quantize_kv,
)
from pagedllm.ops import cpu_ops, cpu_ops_error
from pagedllm.worker.host_memory import huge_page_zeros

RESULTS = Path("benchmarks", "results")  # under the working directory, not the package
NUM_HEADS, NUM_KV_HEADS, HEAD_SIZE, BLOCK_SIZE = 9, 3, 64, 16
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}

# (mode, batch, num_cached, query_len): decode reads a context of num_cached + 1 tokens.
DECODE = [("decode", b, c - 1, 1) for b in (1, 16, 64, 128) for c in (128, 1024, 2048)]
PREFILL = [
    ("prefill", 1, 0, 2048),
    ("prefill", 4, 0, 512),
    ("prefill", 16, 0, 128),
    ("chunked", 4, 768, 256),  # a 256-token chunk on top of 768 cached tokens
]
QUICK = [("decode", 1, 1023, 1), ("decode", 64, 1023, 1), ("prefill", 1, 0, 512)]


@dataclass
class Row:
    mode: str
    dtype: str
    batch: int
    context: int  # tokens attended per sequence (cached + new)
    query_len: int
    kernel_ms: float  # best of the timed calls
    reference_ms: float | None
    sdpa_ms: float
    kernel_median_ms: float
    reference_median_ms: float | None
    sdpa_median_ms: float
    kv_gb: float  # K/V bytes read per call, GB
    kernel_gb_s: float
    kernel_bw_pct: float  # of the measured memory bandwidth
    sdpa_over_kernel: float  # > 1: the kernel is faster than contiguous SDPA


def time_call(fn, min_time: float, max_reps: int = 50) -> tuple[float, float]:
    """(best, median) seconds per call over >= 3 calls, after one warm-up call.

    NOTE: the table reports the best call: on a shared machine the median mostly measures the
    neighbours (a thread that loses its core stalls an OpenMP region for a 4 ms tick).
    """
    fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < 3 or (time.perf_counter() - start < min_time and len(times) < max_reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times), statistics.median(times)


def memory_bandwidth_gb_s(num_bytes: int = 512 << 20) -> dict[str, float]:
    """Best-of-5 read bandwidth (sum) and copy bandwidth (read + write bytes), GB/s."""
    x = torch.rand(num_bytes // 4)
    y = torch.empty_like(x)
    best = {"sum": 0.0, "copy": 0.0}
    for _ in range(5):
        t0 = time.perf_counter()
        x.sum()
        best["sum"] = max(best["sum"], x.nbytes / (time.perf_counter() - t0) / 1e9)
        t0 = time.perf_counter()
        y.copy_(x)
        best["copy"] = max(best["copy"], 2 * x.nbytes / (time.perf_counter() - t0) / 1e9)
    return best


def bench_point(
    mode: str, batch: int, num_cached: int, query_len: int, dtype_name: str,
    bandwidth: float, with_reference: bool, min_time: float, gen: torch.Generator,
) -> Row:
    dtype = DTYPES[dtype_name]
    seq_len = num_cached + query_len
    blocks_per_seq = -(-seq_len // BLOCK_SIZE)
    num_blocks = batch * blocks_per_seq
    perm = torch.randperm(num_blocks, generator=gen)
    block_tables = perm.view(batch, blocks_per_seq).tolist()
    metadata = build_attention_metadata(
        [query_len] * batch, [seq_len] * batch, block_tables, BLOCK_SIZE
    )
    shape = TorchPagedAttention.kv_cache_shape(num_blocks, BLOCK_SIZE, NUM_KV_HEADS, HEAD_SIZE)
    # Placed as the engine's CPU worker places its pools (huge pages where the kernel has them).
    kv_cache = huge_page_zeros(shape, dtype).copy_(torch.randn(shape, generator=gen))
    num_tokens = batch * query_len
    query = torch.randn(num_tokens, NUM_HEADS, HEAD_SIZE, generator=gen).to(dtype)
    key = torch.randn(num_tokens, NUM_KV_HEADS, HEAD_SIZE, generator=gen).to(dtype)
    value = torch.randn(num_tokens, NUM_KV_HEADS, HEAD_SIZE, generator=gen).to(dtype)
    args = (NUM_HEADS, NUM_KV_HEADS, HEAD_SIZE, HEAD_SIZE**-0.5, BLOCK_SIZE)
    kernel, reference = CpuPagedAttention(*args), TorchPagedAttention(*args)

    # SDPA's inputs: the same K/V (new tokens included), contiguous [B, kv_h, seq_len, d].
    kernel.forward(query, key, value, kv_cache, metadata)  # writes the new K/V into the cache
    ids = torch.tensor(block_tables).flatten()
    k_contig, v_contig = (
        kv_cache[i][ids].view(batch, blocks_per_seq * BLOCK_SIZE, NUM_KV_HEADS, HEAD_SIZE)
        [:, :seq_len].transpose(1, 2).contiguous()
        for i in (0, 1)
    )
    q_sdpa = query.view(batch, query_len, NUM_HEADS, HEAD_SIZE).transpose(1, 2)  # [B, h, q, d]
    mask = None
    if query_len > 1 and num_cached > 0:  # bottom-right aligned causal mask
        mask = torch.ones(query_len, seq_len, dtype=torch.bool).tril(diagonal=num_cached)

    def sdpa() -> torch.Tensor:
        return F.scaled_dot_product_attention(
            q_sdpa, k_contig, v_contig, attn_mask=mask,
            is_causal=query_len > 1 and num_cached == 0, enable_gqa=True,
        )

    # Same data, same answer: the table compares like with like.
    got = kernel.forward(query, key, value, kv_cache, metadata)
    want = sdpa().transpose(1, 2).reshape(got.shape)
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol)

    kernel_s, kernel_med = time_call(
        lambda: kernel.forward(query, key, value, kv_cache, metadata), min_time
    )
    sdpa_s, sdpa_med = time_call(sdpa, min_time)
    reference_s = reference_med = None
    if with_reference:
        reference_s, reference_med = time_call(
            lambda: reference.forward(query, key, value, kv_cache, metadata), min_time, 10
        )
    kv_bytes = 2 * batch * seq_len * NUM_KV_HEADS * HEAD_SIZE * kv_cache.element_size()
    gb_s = kv_bytes / kernel_s / 1e9
    ms = lambda s: None if s is None else s * 1e3
    return Row(
        mode, dtype_name, batch, seq_len, query_len, ms(kernel_s), ms(reference_s), ms(sdpa_s),
        ms(kernel_med), ms(reference_med), ms(sdpa_med), kv_bytes / 1e9, gb_s,
        100 * gb_s / bandwidth, sdpa_s / kernel_s,
    )


KV_DTYPES = {"bf16": torch.bfloat16, "int8": INT8_KV_DTYPE, "fp8": FP8_KV_DTYPE}


def kv_pool(num_blocks: int, kv_dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    """One layer's pool of random K/V in `kv_dtype` (int8: quantized rows with their scales)."""
    row = kv_cache_row_size(HEAD_SIZE, kv_dtype)
    shape = TorchPagedAttention.kv_cache_shape(num_blocks, BLOCK_SIZE, NUM_KV_HEADS, row)
    values = torch.randn(*shape[:-1], HEAD_SIZE, generator=gen)
    if kv_dtype == INT8_KV_DTYPE:
        values = quantize_int8_rows(values)
    elif kv_dtype == FP8_KV_DTYPE:
        values = quantize_kv(values, FP8_KV_DTYPE)
    else:
        values = values.to(kv_dtype)
    pool = huge_page_zeros(shape, kv_dtype if kv_dtype != FP8_KV_DTYPE else torch.uint8)
    pool.copy_(values.view(torch.uint8) if kv_dtype == FP8_KV_DTYPE else values)
    return pool.view(FP8_KV_DTYPE) if kv_dtype == FP8_KV_DTYPE else pool


def bench_kv_pools(batch: int, context: int, layers: int, kv_names: list[str], rounds: int,
                   steps: int, gen: torch.Generator,
                   clock=time.perf_counter) -> dict[str, list[float]]:
    """ms per decode step (`layers` kernel calls, one per pool) of each KV dtype, `steps` steps
    per round, the dtypes alternating round by round: {kv dtype: [ms of every step]}. `clock`:
    wall time, or (time.process_time, one thread) the CPU time the process got."""
    blocks_per_seq = -(-context // BLOCK_SIZE)
    num_blocks = batch * blocks_per_seq + 1
    tables = [torch.randperm(num_blocks, generator=gen)[: batch * blocks_per_seq]
              .view(batch, blocks_per_seq).tolist() for _ in range(layers)]
    metas = [build_attention_metadata([1] * batch, [context] * batch, t, BLOCK_SIZE)
             for t in tables]
    pools = {name: [kv_pool(num_blocks, KV_DTYPES[name], gen) for _ in range(layers)]
             for name in kv_names}
    query = torch.randn(batch, NUM_HEADS, HEAD_SIZE, generator=gen).to(torch.bfloat16)
    key = torch.randn(batch, NUM_KV_HEADS, HEAD_SIZE, generator=gen).to(torch.bfloat16)
    value = torch.randn(batch, NUM_KV_HEADS, HEAD_SIZE, generator=gen).to(torch.bfloat16)
    kernel = CpuPagedAttention(NUM_HEADS, NUM_KV_HEADS, HEAD_SIZE, HEAD_SIZE**-0.5, BLOCK_SIZE)

    def step(name: str) -> float:
        t0 = clock()
        for pool, meta in zip(pools[name], metas):
            kernel.forward(query, key, value, pool, meta)
        return (clock() - t0) * 1e3

    times: dict[str, list[float]] = {name: [] for name in kv_names}
    for name in kv_names:
        step(name)  # warm-up
    for _ in range(rounds):
        for name in kv_names:
            times[name] += [step(name) for _ in range(steps)]
    return times


def kv_pools_main(args: argparse.Namespace) -> None:
    gen = torch.Generator().manual_seed(0)
    load_before = os.getloadavg()[0]
    clock = time.process_time if args.cpu_time else time.perf_counter
    print(f"threads {torch.get_num_threads()}, load average {load_before:.2f}; decode of "
          f"{args.batch} sequences, {args.layers} layers' pools, bf16 query, "
          f"{'CPU' if args.cpu_time else 'wall'} ms per step "
          f"(median / best of {args.rounds} rounds x {args.steps} steps)")
    print(f"{'ctx':>5} " + " ".join(f"{name:>15}" for name in args.kv_dtype)
          + "  " + " ".join(f"{name + '/bf16':>10}" for name in args.kv_dtype if name != "bf16"))
    results = []
    for context in args.context:
        times = bench_kv_pools(args.batch, context, args.layers, args.kv_dtype, args.rounds,
                               args.steps, gen, clock)
        med = {name: statistics.median(t) for name, t in times.items()}
        cells = " ".join(f"{med[n]:>7.2f} / {min(times[n]):>5.2f}" for n in args.kv_dtype)
        ratios = " ".join(f"{med[n] / med['bf16']:>10.2f}" for n in args.kv_dtype
                          if n != "bf16" and "bf16" in med)
        print(f"{context:>5} {cells}  {ratios}", flush=True)
        results.append({"context": context, "ms_per_step": times})
    out = args.out if args.out != RESULTS / "attention.json" else RESULTS / "attention_kv_pools.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "threads": torch.get_num_threads(), "load_average_before": load_before,
        "batch": args.batch, "layers": args.layers, "results": results,
    }, indent=2))
    print(f"wrote {out}")


HEADER = (
    f"{'mode':<8} {'dtype':<5} {'batch':>5} {'ctx':>5} {'q':>5} {'cpu_paged ms':>13} "
    f"{'torch_paged ms':>15} {'sdpa ms':>9} {'KV GB/s':>8} {'% BW':>6} {'vs sdpa':>8}"
)


def format_row(r: Row) -> str:
    ref = f"{r.reference_ms:>15.3f}" if r.reference_ms is not None else f"{'-':>15}"
    return (
        f"{r.mode:<8} {r.dtype:<5} {r.batch:>5} {r.context:>5} {r.query_len:>5} "
        f"{r.kernel_ms:>13.3f} {ref} {r.sdpa_ms:>9.3f} {r.kernel_gb_s:>8.2f} "
        f"{r.kernel_bw_pct:>5.0f}% {r.sdpa_over_kernel:>7.2f}x"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few points only")
    parser.add_argument("--dtype", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    parser.add_argument("--no-reference", action="store_true", help="skip torch_paged (slow)")
    parser.add_argument("--min-time", type=float, default=0.2, help="seconds of timing per point")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    parser.add_argument("--out", type=Path, default=RESULTS / "attention.json")
    parser.add_argument("--kv-pools", action="store_true",
                        help="decode steps over many layers' pools, per KV cache dtype")
    parser.add_argument("--kv-dtype", nargs="+", default=list(KV_DTYPES), choices=list(KV_DTYPES))
    parser.add_argument("--context", type=int, nargs="+", default=[128, 192, 256])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=3, help="steps per dtype per round")
    parser.add_argument("--cpu-time", action="store_true",
                        help="--kv-pools: the process's CPU time, not wall time (with --threads "
                             "1: robust to other processes taking the core)")
    args = parser.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    if cpu_ops() is None:
        raise SystemExit(f"cpu_paged kernel unavailable: {cpu_ops_error()}")
    print(f"kernel ready in {time.perf_counter() - t0:.1f} s (build or cached load)")
    if args.kv_pools:
        kv_pools_main(args)
        return
    load_before = os.getloadavg()[0]
    bandwidth = memory_bandwidth_gb_s()
    peak = max(bandwidth.values())
    print(
        f"threads {torch.get_num_threads()}, load average {load_before:.2f}; memory bandwidth: "
        f"sum {bandwidth['sum']:.1f} GB/s, copy {bandwidth['copy']:.1f} GB/s -> {peak:.1f}"
    )
    if load_before > 0.5:
        print(
            f"WARNING: load average {load_before:.2f} before the run: other processes share the "
            "cores, and multi-threaded timings will reflect them (try --threads 1)"
        )
    gen = torch.Generator().manual_seed(0)
    rows: list[Row] = []
    print(HEADER, flush=True)
    for dtype_name in args.dtype:
        for mode, batch, num_cached, query_len in QUICK if args.quick else DECODE + PREFILL:
            rows.append(bench_point(
                mode, batch, num_cached, query_len, dtype_name, peak,
                not args.no_reference, args.min_time, gen,
            ))
            print(format_row(rows[-1]), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "memory_bandwidth_gb_s": bandwidth,
            "load_average_before": load_before,
        },
        "shapes": {"num_heads": NUM_HEADS, "num_kv_heads": NUM_KV_HEADS,
                   "head_size": HEAD_SIZE, "block_size": BLOCK_SIZE},
        "results": [asdict(r) for r in rows],
    }, indent=2))
    print(f"wrote {args.out} ({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
