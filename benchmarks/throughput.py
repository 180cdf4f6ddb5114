"""Offline throughput, like `vllm bench throughput`: pagedllm and its peers on the same requests.

Each engine runs in its own subprocess, one after another, so start-up time and peak RSS are
measured per engine and one engine's memory never slows the next.

    python benchmarks/throughput.py --workload fixed sharegpt-like --dtype bfloat16
    python benchmarks/throughput.py --engines pagedllm transformers --vllm-python /path/venv/bin/python
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


def run_engine(engine: str, python: str, args: argparse.Namespace, workload: str) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out_path = f.name
    cmd = [python, str(HERE / "throughput_runner.py"), "--engine", engine, "--workload", workload,
           "--dtype", args.dtype, "--out", out_path, "--num-requests", str(args.num_requests or 0),
           "--model", args.model]
    env = {**os.environ, "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1",
           "VLLM_CPU_NUM_OF_RESERVED_CPU": "0", "TOKENIZERS_PARALLELISM": "false"}
    env["PYTHONPATH"] = str(HERE.parent / "src") + os.pathsep + env.get("PYTHONPATH", "")
    print(f"--- {engine} on {workload} ---", flush=True)
    proc = subprocess.run(cmd, env=env)
    if proc.returncode != 0:
        return {"engine": engine, "workload": workload, "error": f"exit {proc.returncode}"}
    return json.loads(Path(out_path).read_text())


def print_table(rows: list[dict]) -> None:
    header = (f"{'workload':<14} {'engine':<13} {'req/s':>7} {'out tok/s':>10} {'total tok/s':>12}"
              f" {'startup s':>10} {'peak RSS GiB':>13} {'vs pagedllm':>12}")
    print(header)
    print("-" * len(header))
    base = {r["workload"]: r for r in rows if r["engine"] == "pagedllm" and "error" not in r}
    for r in rows:
        if "error" in r:
            print(f"{r['workload']:<14} {r['engine']:<13} failed: {r['error']}")
            continue
        ref = base.get(r["workload"])
        ratio = r["output_tokens_per_s"] / ref["output_tokens_per_s"] if ref else float("nan")
        print(f"{r['workload']:<14} {r['engine']:<13} {r['requests_per_s']:>7.2f} "
              f"{r['output_tokens_per_s']:>10.1f} {r['total_tokens_per_s']:>12.1f} "
              f"{r['startup_s']:>10.1f} {r['peak_rss_gib']:>13.2f} {ratio:>11.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", nargs="+", default=["fixed"],
                        choices=["fixed", "sharegpt-like"])
    parser.add_argument("--engines", nargs="+", default=["pagedllm", "transformers"],
                        choices=["pagedllm", "transformers", "vllm"])
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    parser.add_argument("--model", default=None, help="HF directory (default: shipped SmolLM2)")
    parser.add_argument("--vllm-python", default=None,
                        help="python of a virtualenv with vllm-cpu installed; adds vLLM")
    parser.add_argument("--num-requests", type=int, default=None, help="override request count")
    parser.add_argument("--out", default=str(RESULTS / "throughput.json"))
    args = parser.parse_args()
    engines = list(args.engines)
    if args.vllm_python and "vllm" not in engines:
        engines.append("vllm")
    if args.model is None:
        sys.path.insert(0, str(HERE.parent / "src"))
        from pagedllm.models.default_model import resolve_model_path

        args.model = str(resolve_model_path(None))
    rows = []
    for workload in args.workload:
        for engine in engines:
            python = args.vllm_python if engine == "vllm" else sys.executable
            if engine == "vllm" and not python:
                print("skipping vllm: pass --vllm-python", file=sys.stderr)
                continue
            rows.append(run_engine(engine, python, args, workload))
    print()
    print_table(rows)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"dtype": args.dtype, "results": rows}, indent=2))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
