"""The int8 kernels per call against the bf16 one, on SmolLM2's projection shapes.

For each row count M it times one pass over 30 layers' projections (qkv 960x576, o 576x576,
gate_up 3072x576, down 576x1536: 120 distinct random weights, so they stream from memory as in
the model) with
- `int8_linear` on the W8A8 GEMM's panels (pack_int8_panels: int8 activations, a scale per
  --group inputs; quantization="int8"'s default, in groups of 16),
- `int8_linear` on int8 rows with 16-bit activations (pack_int8_weight, groups of 64:
  quantization="int8" with PAGEDLLM_INT8_ACTIVATION_BITS=16), up to --rows-a16-max rows (it
  is slow),
- `dot_panel_linear` on bf16 panels (the dense path on CPUs with AVX512_BF16),
taking turns (--rounds, best of each), and prints milliseconds per pass, GOP/s (2 per
multiply-add) and the W8A8 speed-up over bf16.

    python -m pagedllm.benchmarks.int8_gemm [--rows 1 4 16 64 256] [--group 16] [--out PATH]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from pagedllm.benchmarks.linear import best_time
from pagedllm.ops import cpu_ops, cpu_ops_error

RESULTS = Path("benchmarks", "results")  # under the working directory, not the package
SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536)]  # (N, K): qkv, o, gate_up, down
NUM_LAYERS = 30


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 4, 16, 64, 256])
    parser.add_argument("--group", type=int, default=16,
                        help="W8A8 inputs per scale (16: the default of quantization='int8')")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--rows-a16-max", type=int, default=64)
    parser.add_argument("--out", default=str(RESULTS / "int8_gemm.json"))
    args = parser.parse_args()
    ops = cpu_ops()
    if ops is None:
        raise SystemExit(f"CPU ops unavailable: {cpu_ops_error()}")
    gen = torch.Generator().manual_seed(0)
    dense = [[torch.randn(n, k, generator=gen) * 0.02 for n, k in SHAPES]
             for _ in range(NUM_LAYERS)]
    panels = [[ops.pack_int8_panels(w, args.group) for w in layer] for layer in dense]
    rows = [[ops.pack_int8_weight(w, 64) for w in layer] for layer in dense]
    bf16 = [[ops.pack_dot_panels(w.to(torch.bfloat16)) for w in layer] for layer in dense]
    del dense
    macs = sum(n * k for n, k in SHAPES) * NUM_LAYERS
    empty = torch.empty(0)
    print(f"{NUM_LAYERS} layers x {SHAPES}; {torch.get_num_threads()} threads, W8A8 kernel "
          f"{ops.int8_gemm_isa()}, groups of {args.group}")
    header = (f"{'rows':>5} {'w8a8 ms':>9} {'a16 ms':>9} {'bf16 ms':>9} {'w8a8 GOP/s':>11} "
              f"{'a16 GOP/s':>10} {'bf16 GOP/s':>11} {'w8a8/bf16':>10}")
    print(header)
    print("-" * len(header))
    results = []
    for m in args.rows:
        xs = [torch.randn(m, k, generator=gen).to(torch.bfloat16) for _, k in SHAPES]
        outs = [torch.empty(m, n, dtype=torch.bfloat16) for n, _ in SHAPES]

        def run_int8(weights, bits, xs=xs, outs=outs):
            for layer in weights:
                for (q, s), x, o in zip(layer, xs, outs):
                    ops.int8_linear(o, x, q, s, empty, True, bits)

        def run_bf16(xs=xs, outs=outs):
            for layer in bf16:
                for p, x, o in zip(layer, xs, outs):
                    ops.dot_panel_linear(o, x, p, empty)

        w8a8 = dense_s = a16 = float("inf")
        for _ in range(args.rounds):
            w8a8 = min(w8a8, best_time(lambda: run_int8(panels, 8), 1))
            dense_s = min(dense_s, best_time(run_bf16, 1))
            if m <= args.rows_a16_max:
                a16 = min(a16, best_time(lambda: run_int8(rows, 16), 1))
        gops = [2 * macs * m / t / 1e9 for t in (w8a8, a16, dense_s)]
        print(f"{m:>5} {w8a8 * 1e3:>9.2f} {a16 * 1e3:>9.2f} {dense_s * 1e3:>9.2f} "
              f"{gops[0]:>11.1f} {gops[1]:>10.1f} {gops[2]:>11.1f} {dense_s / w8a8:>9.2f}x")
        results.append({"rows": m, "w8a8_s": w8a8, "a16_s": a16, "bf16_s": dense_s,
                        "w8a8_gops": gops[0], "a16_gops": gops[1], "bf16_gops": gops[2]})
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"group": args.group, "threads": torch.get_num_threads(),
                               "shapes": SHAPES, "layers": NUM_LAYERS, "rows": results},
                              indent=2, default=lambda v: None))


if __name__ == "__main__":
    main()
