"""The quantized linear kernels per call, on the shipped SmolLM2 GGUF's own tensors.

For each row count M it times one pass over the 30 layers' projections (qkv, o, gate_up,
down: 120 distinct weights, so they stream from memory as in the model) and, apart, the LM
head, with
- `gguf_linear` on the file's blocks as they are (Q4_1 projections, the Q8_0 token table as
  the tied LM head), with 8-bit (a8) and 16-bit (a16, the default) activations,
- `gguf_linear` on the same blocks repacked into panels of 16 rows (`gguf_pack_panels_`, what
  the engine runs: ops/csrc/quant_panels.cpp), a8 and a16 (a scale per 32 inputs) and a8g16
  (8 bits, a scale per 16 inputs),
- `int8_linear` on the same weights dequantized then packed to per-channel int8
  (quantization="int8"), a8 and a16,
- the dense bf16 path the engine uses on these weights (`PackedWeight` of the dequantized
  weight in bf16: the VDPBF16PS dot-product kernel on CPUs with AVX512_BF16),
and reports milliseconds per pass and the operations per second (GOP/s, 2 per multiply-add);
the JSON has the weight bytes read per second too. Few rows are bound by streaming the weights (and
unpacking them), many rows by the integer dot products.

    python -m pagedllm.benchmarks.quant_linear [--rows 1 2 4 8 16 64 256] [--out PATH]
        [--variants 'panels a16' 'panels a8g16' bf16]

Writes benchmarks/results/quant_linear.json under the working directory unless --out names
a file.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from pagedllm.benchmarks.linear import best_time
from pagedllm.ops import cpu_ops, cpu_ops_error

RESULTS = Path("benchmarks", "results")  # under the working directory, not the package
# GGUF tensor names of one layer's projections, fused as the engine fuses them.
PARTS = [("attn_q", "attn_k", "attn_v"), ("attn_output",), ("ffn_gate", "ffn_up"),
         ("ffn_down",)]


def load_weights(path: Path):
    """Per layer, the fused projections as (raw blocks uint8 [N, bytes], ggml type, K), and
    the token table (the tied LM head)."""
    from gguf import GGUFReader

    reader = GGUFReader(path)
    tensors = {t.name: t for t in reader.tensors}
    num_layers = 1 + max(int(n.split(".")[1]) for n in tensors if n.startswith("blk."))

    def raw(name: str):
        t = tensors[name]
        return (torch.from_numpy(np.array(t.data).view(np.uint8)).reshape(
            int(t.shape[1]), -1), int(t.tensor_type), int(t.shape[0]))

    layers = []
    for i in range(num_layers):
        fused = []
        for names in PARTS:
            parts = [raw(f"blk.{i}.{n}.weight") for n in names]
            assert len({(p[1], p[2]) for p in parts}) == 1, "a fused layer of mixed types"
            fused.append((torch.cat([p[0] for p in parts]), parts[0][1], parts[0][2]))
        layers.append(fused)
    return layers, raw("token_embd.weight")


def _panels(weight: tuple[torch.Tensor, int, int]) -> tuple[torch.Tensor, int, int]:
    """A copy of (blocks, ggml type, K) repacked into panels where the type has them."""
    from pagedllm.layers.quantization.gguf import PANEL_TYPES

    blocks, ggml_type, k = weight
    if ggml_type not in PANEL_TYPES:
        return weight
    packed = blocks.clone()
    return packed, cpu_ops().gguf_pack_panels_(packed, ggml_type), k


def dequantized(blocks: torch.Tensor, ggml_type: int, k: int) -> torch.Tensor:
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    values = dequantize(blocks.numpy(), GGMLQuantizationType(ggml_type))
    return torch.from_numpy(values.reshape(blocks.shape[0], k).copy())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8, 16, 64, 256])
    parser.add_argument("--variants", nargs="+", default=None,
                        help="only these columns (e.g. 'panels a16' 'panels a8g16' bf16)")
    parser.add_argument("--gguf", default=None, help="a Llama GGUF (default: the shipped one)")
    parser.add_argument("--out", default=str(RESULTS / "quant_linear.json"))
    args = parser.parse_args()
    ops = cpu_ops()
    if ops is None:
        raise SystemExit(f"CPU ops unavailable: {cpu_ops_error()}")
    from pagedllm.layers.packed import try_pack
    from pagedllm.models.default_model import default_gguf_path

    path = Path(args.gguf) if args.gguf else default_gguf_path()
    layers, head = load_weights(path)
    panel_layers = [[_panels(w) for w in layer] for layer in layers]
    head_panels = _panels(head)
    dense = [[dequantized(*w) for w in layer] for layer in layers]
    int8 = [[ops.pack_int8_weight(w) for w in layer] for layer in dense]
    packed = [[try_pack(w.to(torch.bfloat16)) for w in layer] for layer in dense]
    head_dense = dequantized(*head)
    head_int8 = ops.pack_int8_weight(head_dense)
    head_packed = try_pack(head_dense.to(torch.bfloat16))
    del dense, head_dense
    shapes = [(w[0].shape[0], w[2]) for w in layers[0]]
    macs = sum(n * k for n, k in shapes) * len(layers)
    head_macs = head[0].shape[0] * head[2]
    nbytes = {
        "gguf": sum(w[0].numel() for layer in layers for w in layer),
        "panels": sum(w[0].numel() for layer in layers for w in layer),
        "int8": sum(b.numel() + s.numel() * 4 for layer in int8 for b, s in layer),
        "bf16": 2 * macs,
    }
    head_bytes = {"gguf": head[0].numel(), "panels": head[0].numel(), "int8": head_int8[0].numel() + 4 * head[0].shape[0],
                  "bf16": 2 * head_macs}
    print(f"{path.name}: {len(layers)} layers x {len(shapes)} projections {shapes}, "
          f"LM head {tuple(head[0].shape[:1]) + (head[2],)}; {torch.get_num_threads()} threads, "
          f"kernel {ops.quant_kernel_isa()}")
    all_names = ["gguf a8", "gguf a16", "panels a8", "panels a16", "panels a8g16", "int8 a8",
                 "int8 a16", "bf16"]
    names = all_names if args.variants is None else [n for n in all_names if n in args.variants]
    header = (f"{'rows':>5} {'what':>7} " + " ".join(f"{n + ' ms':>13}" for n in names)
              + "  " + " ".join(f"{n + ' GOP/s':>16}" for n in names))
    print(header)
    print("-" * len(header))
    results = []
    empty = torch.empty(0)

    def bench_rows(m: int) -> None:
        xs = [torch.randn(m, k).to(torch.bfloat16) for _, k in shapes]
        outs = [torch.empty(m, n, dtype=torch.bfloat16) for n, _ in shapes]
        xh = torch.randn(m, head[2]).to(torch.bfloat16)
        oh = torch.empty(m, head[0].shape[0], dtype=torch.float32)

        def gguf_pass(bits: int) -> None:
            for layer in layers:
                for (w, t, _), x, o in zip(layer, xs, outs):
                    ops.gguf_linear(o, x, w, t, empty, True, bits, 32)

        def panels_pass(bits: int, group: int = 32) -> None:
            for layer in panel_layers:
                for (w, t, _), x, o in zip(layer, xs, outs):
                    ops.gguf_linear(o, x, w, t, empty, True, bits, group)

        def int8_pass(bits: int) -> None:
            for layer in int8:
                for (b, s), x, o in zip(layer, xs, outs):
                    ops.int8_linear(o, x, b, s, empty, True, bits)

        def bf16_pass() -> None:
            for layer in packed:
                for p, x in zip(layer, xs):
                    p(x)

        repeats = 3 if m >= 64 else 5
        variants = {
            "layers": ([lambda: gguf_pass(8), lambda: gguf_pass(16), lambda: panels_pass(8),
                        lambda: panels_pass(16), lambda: panels_pass(8, 16),
                        lambda: int8_pass(8), lambda: int8_pass(16), bf16_pass], macs, nbytes),
            "lm_head": ([lambda: ops.gguf_linear(oh, xh, head[0], head[1], empty, True, 8, 32),
                         lambda: ops.gguf_linear(oh, xh, head[0], head[1], empty, True, 16, 32),
                         lambda: ops.gguf_linear(oh, xh, head_panels[0], head_panels[1], empty,
                                                 True, 8, 32),
                         lambda: ops.gguf_linear(oh, xh, head_panels[0], head_panels[1], empty,
                                                 True, 16, 32),
                         lambda: ops.gguf_linear(oh, xh, head_panels[0], head_panels[1], empty,
                                                 True, 8, 16),
                         lambda: ops.int8_linear(oh, xh, *head_int8, empty, True, 8),
                         lambda: ops.int8_linear(oh, xh, *head_int8, empty, True, 16),
                         lambda: head_packed(xh)], head_macs, head_bytes),
        }
        for what, (fns, n_macs, sizes) in variants.items():
            row = {"rows": m, "what": what}
            for name, fn in zip(all_names, fns):
                if name not in names:
                    continue
                t = best_time(fn, repeats)
                key = name.replace(" ", "_")
                row[f"{key}_ms"] = t * 1e3
                row[f"{key}_gops"] = 2 * m * n_macs / t / 1e9
                row[f"{key}_weight_gb_s"] = sizes[name.split()[0]] / t / 1e9
            results.append(row)
            keys = [n.replace(" ", "_") for n in names]
            print(f"{m:>5} {what:>7} " + " ".join(f"{row[f'{k}_ms']:>13.2f}" for k in keys)
                  + "  " + " ".join(f"{row[f'{k}_gops']:>16.1f}" for k in keys), flush=True)

    for m in args.rows:
        bench_rows(m)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({
        "model": str(path), "threads": torch.get_num_threads(),
        "kernel": ops.quant_kernel_isa(), "weight_bytes": nbytes,
        "head_weight_bytes": head_bytes, "results": results}, indent=2))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
