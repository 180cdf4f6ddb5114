"""Offline throughput, like `vllm bench throughput`: pagedllm and its peers on the same requests.

Each engine runs in its own subprocess, one after another, so start-up time and peak RSS are
measured per engine and one engine's memory never slows the next.

    python benchmarks/throughput.py --workload fixed sharegpt-like single --dtype bfloat16
    python benchmarks/throughput.py --engines pagedllm:bfloat16 pagedllm:float32 \
        transformers:float32 vllm:float32 --vllm-python /path/venv/bin/python
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"


def run_engine(engine: str, dtype: str, python: str, args: argparse.Namespace) -> list[dict]:
    """Runs one engine at one dtype over every workload in one subprocess (one start-up)."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out_path = f.name
    cmd = [python, str(HERE / "throughput_runner.py"), "--engine", engine,
           "--workloads", *args.workload, "--dtype", dtype, "--out", out_path,
           "--num-requests", str(args.num_requests or 0), "--model", args.model]
    env = {**os.environ, "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1",
           "VLLM_CPU_NUM_OF_RESERVED_CPU": "0", "TOKENIZERS_PARALLELISM": "false"}
    env["PYTHONPATH"] = str(HERE.parent / "src") + os.pathsep + env.get("PYTHONPATH", "")
    print(f"--- {engine} ({dtype}) on {', '.join(args.workload)} ---", flush=True)
    proc = subprocess.run(cmd, env=env)
    text = Path(out_path).read_text()
    done = json.loads(text) if text else []
    finished = {r["workload"] for r in done}
    failed = [{"engine": engine, "dtype": dtype, "workload": w, "error": f"exit {proc.returncode}"}
              for w in args.workload if w not in finished]
    return done + failed


def measure_matmul_peak() -> dict:
    """Best GFLOP/s of large GEMMs here: plain torch.matmul and oneDNN-packed linear, per dtype.

    The workload's arithmetic limit uses the fastest rate any path reaches for its weights. It
    is timed before and after the engines run and the faster reading counts: a single burst
    caught a slow minute once (102 GFLOP/s against 136-163 in other runs), which put a run at
    105% of its "limit".
    """
    import time

    import torch

    def rate(fn, flops: float) -> float:
        fn()
        best = float("inf")
        for _ in range(5):
            start = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - start)
        return flops / best / 1e9

    peaks = {}
    for dtype in (torch.float32, torch.bfloat16):
        a, b = torch.randn(1024, 1024, dtype=dtype), torch.randn(1024, 1024, dtype=dtype)
        entry = {"torch.matmul": rate(lambda: a @ b, 2 * 1024**3)}
        x, w = torch.randn(2048, 576, dtype=dtype), torch.randn(3072, 576, dtype=dtype)
        try:
            packed = torch.ops.mkldnn._reorder_linear_weight(w, 2048)
            entry["onednn packed linear"] = rate(
                lambda: torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], ""),
                2 * 2048 * 576 * 3072)
        except RuntimeError:
            pass  # no oneDNN path for this dtype on this CPU
        peaks[str(dtype).removeprefix("torch.")] = entry
    return peaks


def workload_flops(model_dir: str, requests) -> float:
    """2 x weights per token through the projections; the LM head only for generated tokens."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    heads = config["num_attention_heads"]
    head_size = config.get("head_dim") or hidden // heads
    kv = config.get("num_key_value_heads", heads) * head_size
    per_layer = hidden * (heads * head_size + 2 * kv) + heads * head_size * hidden + 3 * hidden * inter
    per_token = 2 * per_layer * config["num_hidden_layers"]
    lm_head = 2 * hidden * config["vocab_size"]
    prompt = sum(len(r.prompt_token_ids) for r in requests)
    output = sum(r.output_len for r in requests)
    return prompt * per_token + output * (per_token + lm_head)


def print_table(rows: list[dict], limits: dict[str, float]) -> None:
    header = (f"{'workload':<14} {'engine':<22} {'req/s':>7} {'out tok/s':>10} {'total tok/s':>12}"
              f" {'startup s':>10} {'1st token s':>12} {'peak RSS GiB':>13} {'vs pagedllm':>12}"
              f" {'of limit':>9}")
    print(header)
    print("-" * len(header))
    # The ratio column compares with the fastest pagedllm row of the same workload.
    base: dict[str, dict] = {}
    for r in rows:
        if r["engine"] == "pagedllm" and "error" not in r:
            best = base.get(r["workload"])
            if best is None or r["output_tokens_per_s"] > best["output_tokens_per_s"]:
                base[r["workload"]] = r
    for r in rows:
        name = f"{r['engine']} ({r['dtype']})"
        if "error" in r:
            print(f"{r['workload']:<14} {name:<22} failed: {r['error']}")
            continue
        ref = base.get(r["workload"])
        ratio = r["output_tokens_per_s"] / ref["output_tokens_per_s"] if ref else float("nan")
        limit = limits.get(r["workload"])
        share = f"{r['output_tokens_per_s'] / limit:>8.0%}" if limit else f"{'-':>8}"
        print(f"{r['workload']:<14} {name:<22} {r['requests_per_s']:>7.2f} "
              f"{r['output_tokens_per_s']:>10.1f} {r['total_tokens_per_s']:>12.1f} "
              f"{r['startup_s']:>10.1f} {r['first_token_s']:>12.1f} {r['peak_rss_gib']:>13.2f} "
              f"{ratio:>11.2f}x {share}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", nargs="+", default=["fixed"],
                        choices=["fixed", "sharegpt-like", "single"])
    parser.add_argument("--engines", nargs="+", default=["pagedllm", "transformers"],
                        help="engine or engine:dtype, engine one of pagedllm, transformers, vllm "
                             "(e.g. pagedllm:bfloat16 vllm:float32)")
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"],
                        help="dtype of engines given without one")
    parser.add_argument("--model", default=None, help="HF directory (default: shipped SmolLM2)")
    parser.add_argument("--vllm-python", default=None,
                        help="python of a virtualenv with vllm-cpu installed; adds vLLM")
    parser.add_argument("--num-requests", type=int, default=None,
                        help="override the request count (not of the single workload)")
    parser.add_argument("--out", default=str(RESULTS / "throughput.json"))
    args = parser.parse_args()
    specs = [tuple(e.split(":", 1)) if ":" in e else (e, args.dtype) for e in args.engines]
    for engine, dtype in specs:
        if engine not in ("pagedllm", "transformers", "vllm") or dtype not in ("float32",
                                                                                 "bfloat16"):
            parser.error(f"bad engine spec {engine}:{dtype}")
    if args.vllm_python and not any(engine == "vllm" for engine, _ in specs):
        specs.append(("vllm", args.dtype))
    sys.path.insert(0, str(HERE.parent / "src"))
    sys.path.insert(0, str(HERE))
    if args.model is None:
        from pagedllm.models.default_model import resolve_model_path

        args.model = str(resolve_model_path(None))
    from workloads import make_requests

    peaks = {"before": measure_matmul_peak()}
    print("matmul peak GFLOP/s, before the engines:", json.dumps(peaks["before"]))
    rows = []
    for engine, dtype in specs:
        python = args.vllm_python if engine == "vllm" else sys.executable
        if engine == "vllm" and not python:
            print("skipping vllm: pass --vllm-python", file=sys.stderr)
            continue
        rows += run_engine(engine, dtype, python, args)
    peaks["after"] = measure_matmul_peak()
    print("matmul peak GFLOP/s, after the engines:", json.dumps(peaks["after"]))
    best_rate = max(rate for when in peaks.values() for entry in when.values()
                    for rate in entry.values())
    limits = {}
    for workload in args.workload:
        requests = make_requests(workload, args.num_requests)
        seconds = workload_flops(args.model, requests) / (best_rate * 1e9)
        if workload != "single":  # one request is memory-bound, not compute-bound
            limits[workload] = sum(r.output_len for r in requests) / seconds
    print()
    print(f"matmul peak (best path, GFLOP/s): {best_rate:.0f}; arithmetic limits (output tok/s): "
          + ", ".join(f"{k} {v:.0f}" for k, v in limits.items()))
    print_table(rows, limits)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(
        {"matmul_peak_gflops": peaks, "arithmetic_limit_output_tok_s": limits, "results": rows},
        indent=2))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
