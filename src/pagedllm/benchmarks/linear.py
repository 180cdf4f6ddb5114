"""The linear layers' CPU paths on SmolLM2's projection shapes, as the model runs them.

For each row count M (tokens in the step) and weight dtype it times one pass over the 30
layers' projections (qkv, o, gate_up, down: 30 distinct weights of each, so they stream from
memory as in the model, not from cache) with
- `F.linear` on the plain weight (torch's default),
- oneDNN on a packed weight (`torch.ops.mkldnn._linear_pointwise`; fp32 math for a bf16 weight
  where this CPU has no bf16 GEMM),
- pagedllm's weight-streaming kernel (`linear_few_rows` over the row-major weight; the engine
  uses it up to `FEW_ROWS` rows only for bf16 weights on CPUs with a bf16 GEMM),
- pagedllm's panel kernels (`panel_linear`) on weights packed into column panels in their own
  dtype (a bf16 weight stays bf16 in memory): sequential passes over the panels up to 8 rows,
  a register-tiled GEMM above,
- on CPUs with AVX512_BF16, for bf16 weights, pagedllm's bf16 dot-product kernel
  (`dot_panel_linear`, VDPBF16PS) on weights packed in pairs of inputs: the engine's only path
  for bf16 weights there,
and reports milliseconds per pass, GFLOP/s and the weight bytes read per second.

    python -m pagedllm.benchmarks.linear [--rows 1 2 4 8 16 64 2048] [--out PATH]

Writes benchmarks/results/linear.json under the working directory unless --out names a file.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from pagedllm.layers.linear import FEW_ROWS, onednn_has_gemm
from pagedllm.ops import cpu_ops, cpu_ops_error

RESULTS = Path("benchmarks", "results")  # under the working directory, not the package

NUM_LAYERS = 30
# SmolLM2-135M: (out, in) of qkv, o, gate_up, down.
SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536)]


def best_time(fn, repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8, 16, 64, 2048])
    parser.add_argument("--out", default=str(RESULTS / "linear.json"))
    args = parser.parse_args()
    ops = cpu_ops()
    if ops is None:
        raise SystemExit(f"CPU ops unavailable: {cpu_ops_error()}")
    torch.manual_seed(0)
    rows_out = []
    has_dot = ops.has_bf16_dot()
    header = (f"{'rows':>5} {'weight':>7} {'F.linear ms':>12} {'oneDNN ms':>10} {'stream ms':>10}"
              f" {'panel ms':>9} {'dot ms':>7}"
              f" {'best':>9} {'GFLOP/s':>8} {'weight GB/s':>12}")
    print(f"{NUM_LAYERS} layers x {len(SHAPES)} projections, {torch.get_num_threads()} threads")
    print(header)
    print("-" * len(header))
    for dtype in (torch.float32, torch.bfloat16):
        weights = [[torch.randn(n, k).to(dtype) for n, k in SHAPES] for _ in range(NUM_LAYERS)]
        # oneDNN in its best form here: the weight's dtype where it has that GEMM, else fp32.
        compute = dtype if onednn_has_gemm(dtype) else torch.float32
        reordered = [[torch.ops.mkldnn._reorder_linear_weight(w.to(compute), 64) for w in layer]
                     for layer in weights]
        panels = [[ops.pack_panels(w) for w in layer] for layer in weights]
        with_dot = has_dot and dtype == torch.bfloat16
        dots = [[ops.pack_dot_panels(w) for w in layer] for layer in weights] if with_dot else []
        weight_bytes = sum(w.numel() * w.element_size() for layer in weights for w in layer)
        for m in args.rows:
            inputs = [torch.randn(m, k).to(dtype) for _, k in SHAPES]
            outs = [torch.empty(m, n, dtype=dtype) for n, _ in SHAPES]
            empty = torch.empty(0)
            flops = 2 * m * sum(n * k for n, k in SHAPES) * NUM_LAYERS

            def f_linear() -> None:
                for layer in weights:
                    for w, x in zip(layer, inputs):
                        F.linear(x, w)

            def onednn() -> None:
                for layer in reordered:
                    for w, x in zip(layer, inputs):
                        out = torch.ops.mkldnn._linear_pointwise(x.to(compute), w, None, "none",
                                                                 [], "")
                        out.to(dtype)

            def stream() -> None:
                for layer in weights:
                    for w, x, o in zip(layer, inputs, outs):
                        ops.linear_few_rows(o, x, w, empty)

            def panel() -> None:
                for layer in panels:
                    for p, x, o in zip(layer, inputs, outs):
                        ops.panel_linear(o, x, p, empty)

            def dot() -> None:
                for layer in dots:
                    for p, x, o in zip(layer, inputs, outs):
                        ops.dot_panel_linear(o, x, p, empty)

            repeats = 3 if m >= 64 else 5
            # bf16 F.linear has no fast path on CPUs without bf16 GEMM: time it once, briefly.
            slow = dtype == torch.bfloat16 and m > 16 and not onednn_has_gemm(dtype)
            times = {
                "F.linear": None if slow else best_time(f_linear, repeats),
                "oneDNN": best_time(onednn, repeats),
                "stream": best_time(stream, repeats) if m <= 2 * FEW_ROWS else None,
                "panel": best_time(panel, repeats),
                "dot": best_time(dot, repeats) if with_dot else None,
            }
            best_name = min((k for k, v in times.items() if v is not None), key=times.get)
            best = times[best_name]
            row = {"rows": m, "weight_dtype": str(dtype).removeprefix("torch."),
                   **{f"{k}_ms": None if v is None else v * 1e3 for k, v in times.items()},
                   "best": best_name, "gflops": flops / best / 1e9,
                   "weight_gb_s": weight_bytes / best / 1e9}
            rows_out.append(row)
            cells = [f"{'-' if v is None else f'{v * 1e3:.1f}':>{w}}"
                     for v, w in zip(times.values(), (12, 10, 10, 9, 7))]
            print(f"{m:>5} {row['weight_dtype']:>7} {' '.join(cells)} {best_name:>9} "
                  f"{row['gflops']:>8.1f} {row['weight_gb_s']:>12.1f}", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"threads": torch.get_num_threads(),
                                          "results": rows_out}, indent=2))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
