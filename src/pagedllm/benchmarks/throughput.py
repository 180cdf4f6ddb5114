"""Offline throughput, like `vllm bench throughput`: pagedllm and its peers on the same requests.

Each engine runs in its own subprocess (`python -m pagedllm.benchmarks.throughput_runner`, vLLM
under its own virtualenv's python), started one after another so
that start-up time and peak RSS are its own, and kept loaded. Then, for each of --rounds
rounds, every workload runs on every engine in turn (the order rotating each round), so a
slow minute on this shared machine lands on one round of every engine instead of on one
engine's whole pass; each engine's row is its median round (three rounds by default;
`--rounds 1` is one pass per engine: quicker, noisier).

    pagedllm bench throughput --workload fixed sharegpt-like single --dtype bfloat16
    pagedllm bench throughput --engines pagedllm:bfloat16 pagedllm:float32 \
        transformers:float32 vllm:float32 --vllm-python /path/venv/bin/python --rounds 1

(or `python -m pagedllm.benchmarks.throughput ...`). Prints a table and writes JSON to
--output-json (default benchmarks/results/throughput.json under the working directory).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from tqdm import tqdm

from pagedllm.benchmarks.package_path import with_pagedllm_on_path

RESULTS = Path("benchmarks", "results")  # under the working directory, not the package


class EngineProcess:
    """One engine at one dtype, loaded once in a subprocess and sent workloads by name."""

    def __init__(self, engine: str, dtype: str, python: str, args: argparse.Namespace) -> None:
        self.engine, self.dtype = engine, dtype  # engine: e.g. pagedllm, or pagedllm@tp2
        name, _, tp = engine.partition("@tp")
        read_fd, write_fd = os.pipe()
        cmd = [python, "-m", "pagedllm.benchmarks.throughput_runner", "--engine", name,
               "--tensor-parallel-size", tp or "1",
               "--dtype", dtype, "--num-requests", str(args.num_requests or 0),
               "--model", args.model,
               "--quantization", args.quantization,
               "--kv-cache-dtype", getattr(args, "kv_cache_dtype", "auto"),
               "--transformers-batch-sizes", *map(str, args.transformers_batch_sizes),
               "--result-fd", str(write_fd)]
        # NOTE: vLLM's virtualenv has no pagedllm: the runner imports this one (package_path.py).
        env = with_pagedllm_on_path({
            **os.environ, "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1",
            "VLLM_CPU_NUM_OF_RESERVED_CPU": "0", "TOKENIZERS_PARALLELISM": "false"})
        tqdm.write(f"--- starting {engine} ({dtype}) ---")
        self.results = os.fdopen(read_fd)
        try:
            self.proc = subprocess.Popen(cmd, env=env, stdin=subprocess.PIPE, text=True,
                                         pass_fds=(write_fd,))
        except OSError as e:  # e.g. a --vllm-python that does not exist
            self.proc = None
            self.ready = {"error": f"cannot start {python}: {e}"}
            return
        finally:
            os.close(write_fd)  # the child holds the only write end: its exit reads as EOF
        self.ready = self._reply()  # startup_s and first_token_s, or an error

    def _reply(self) -> dict:
        line = self.results.readline()
        if line:
            return json.loads(line)
        return {"error": f"exit {self.proc.wait()}"}

    def run(self, workload: str, round_index: int) -> dict:
        if "error" in self.ready:
            return {"error": self.ready["error"]}
        if self.proc.poll() is not None:
            return {"error": f"exit {self.proc.returncode}"}
        tqdm.write(f"--- {self.engine} ({self.dtype}) on {workload} ---")
        try:
            self.proc.stdin.write(f"{workload} {round_index}\n")
            self.proc.stdin.flush()
        except BrokenPipeError:  # it died since its last reply
            return {"error": f"exit {self.proc.wait()}"}
        return self._reply()

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait()
        self.results.close()


def summarize(engine: str, dtype: str, workload: str, ready: dict, rounds: list[dict]) -> dict:
    """One table row: the median round (by elapsed time) of an engine on a workload."""
    done = [r for r in rounds if "error" not in r]
    if not done:
        return {"engine": engine, "dtype": dtype, "workload": workload,
                "error": (rounds[0] if rounds else ready).get("error", "not run")}
    median = sorted(done, key=lambda r: r["elapsed_s"])[(len(done) - 1) // 2]
    elapsed = median["elapsed_s"]
    return {
        "engine": engine, "dtype": dtype, "workload": workload,
        "num_requests": median["num_requests"],
        "prompt_tokens": median["prompt_tokens"],
        "output_tokens": median["output_tokens"],
        "elapsed_s": elapsed,
        "requests_per_s": median["num_requests"] / elapsed,
        "output_tokens_per_s": median["output_tokens"] / elapsed,
        "total_tokens_per_s": (median["prompt_tokens"] + median["output_tokens"]) / elapsed,
        "startup_s": ready["startup_s"],
        "first_token_s": ready["first_token_s"],
        "peak_rss_gib": max(r["peak_rss_gib"] for r in done),
        "rounds_output_tokens_per_s": [r["output_tokens"] / r["elapsed_s"] if "error" not in r
                                       else None for r in rounds],
    }


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
    """2 x weights per token through the projections; the LM head only for generated tokens.
    The config is read through transformers, which maps each family's names (GPT-2's n_embd,
    OPT's ffn_dim) to the common ones."""
    from pagedllm.models.hf_fast import load_config

    config = load_config(Path(model_dir))
    hidden, heads = config.hidden_size, config.num_attention_heads
    inter = (getattr(config, "intermediate_size", None) or getattr(config, "ffn_dim", None)
             or getattr(config, "n_inner", None) or 4 * hidden)
    head_size = getattr(config, "head_dim", None) or hidden // heads
    kv = (getattr(config, "num_key_value_heads", None) or heads) * head_size
    # GPT-2 and OPT have a plain up/down MLP; the others gate it (gate, up, down).
    mlp_matrices = 2 if config.model_type in ("gpt2", "opt") else 3
    per_layer = (hidden * (heads * head_size + 2 * kv) + heads * head_size * hidden
                 + mlp_matrices * hidden * inter)
    per_token = 2 * per_layer * config.num_hidden_layers
    lm_head = 2 * hidden * config.vocab_size
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


def print_rounds(rows: list[dict]) -> None:
    """Each engine's output tok/s per round, and pagedllm's ratio to it in that same round."""
    if max((len(r.get("rounds_output_tokens_per_s", [])) for r in rows), default=0) < 2:
        return
    print("\nper round, output tok/s (pagedllm's ratio to the engine in the same round):")
    for r in rows:
        if "error" in r:
            continue
        ours = next((p["rounds_output_tokens_per_s"] for p in rows if p["engine"] == "pagedllm"
                     and p["workload"] == r["workload"] and "error" not in p), None)
        cells = []
        for k, rate in enumerate(r["rounds_output_tokens_per_s"]):
            if rate is None:
                cells.append("failed")
            elif r["engine"] == "pagedllm" or ours is None or ours[k] is None:
                cells.append(f"{rate:.1f}")
            else:
                cells.append(f"{rate:.1f} ({ours[k] / rate:.2f}x)")
        print(f"  {r['workload']:<14} {r['engine'] + ' (' + r['dtype'] + ')':<22} "
              + ", ".join(cells))


def add_cli_args(parser: argparse.ArgumentParser) -> None:
    """The flags of `pagedllm bench throughput`."""
    parser.add_argument("--workload", nargs="+", default=["fixed"],
                        choices=["fixed", "sharegpt-like", "single"])
    parser.add_argument("--engines", nargs="+", default=["pagedllm", "transformers"],
                        help="engine or engine:dtype, engine one of pagedllm, transformers, vllm "
                             "(e.g. pagedllm:bfloat16 vllm:float32); pagedllm@tpN runs pagedllm "
                             "at tensor_parallel_size N (N worker processes, cores shared)")
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"],
                        help="dtype of engines given without one")
    parser.add_argument("--model", default=None, help="HF directory (default: shipped SmolLM2)")
    parser.add_argument("--quantization", default="none", choices=["none", "auto", "int8"],
                        help="pagedllm's weight quantization (vLLM's name; auto keeps a .gguf's "
                             "blocks), for every pagedllm engine")
    parser.add_argument("--kv-cache-dtype", default="auto",
                        choices=["auto", "int8", "fp8", "fp8_e5m2"],
                        help="pagedllm's KV cache element type (vLLM's name), for every "
                             "pagedllm engine")
    parser.add_argument("--vllm-python", default=None,
                        help="python of a virtualenv with vllm-cpu installed; adds vLLM")
    parser.add_argument("--num-requests", type=int, default=None,
                        help="override the request count (not of the single workload)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="times each engine runs each workload, engines taking turns; "
                             "each row is the engine's median round (one pass per engine "
                             "leaves a slow minute on one engine's whole figure)")
    parser.add_argument("--transformers-batch-sizes", type=int, nargs="+", default=[32, 64],
                        help="static batch sizes transformers tries (its best counts)")
    parser.add_argument("--output-json", "--out", dest="output_json",
                        default=str(RESULTS / "throughput.json"),
                        help="where the results go (default: %(default)s)")
    parser.add_argument("--disable-tqdm", action="store_true", help="no progress bar")


def check_args(args: argparse.Namespace) -> list[tuple[str, str]]:
    """The (engine, dtype) pairs to run; ValueError for a bad flag."""
    if args.rounds < 1:
        raise ValueError("--rounds must be at least 1")
    specs = [tuple(e.split(":", 1)) if ":" in e else (e, args.dtype) for e in args.engines]
    for engine, dtype in specs:
        name, tp_mark, tp = engine.partition("@tp")
        if (name not in ("pagedllm", "transformers", "vllm")
                or dtype not in ("float32", "bfloat16")
                or (tp_mark and (name != "pagedllm" or not tp.isdigit() or int(tp) < 1))):
            raise ValueError(f"bad engine spec {engine}:{dtype}: pagedllm (or pagedllm@tpN), "
                             "transformers or vllm, optionally :float32 or :bfloat16")
    if args.vllm_python and not any(engine == "vllm" for engine, _ in specs):
        specs.append(("vllm", args.dtype))
    return specs


def run(args: argparse.Namespace) -> int:
    """Runs the benchmark of parsed flags (add_cli_args); prints the table, writes the JSON."""
    specs = check_args(args)
    from pagedllm.models.default_model import resolve_model_path

    if args.model is None:
        args.model = str(resolve_model_path(None))
    # A .gguf runs as it is (quantization="auto" keeps its blocks); its arithmetic is counted
    # from the Hugging Face directory it converts to.
    config_dir = str(resolve_model_path(args.model))
    from pagedllm.benchmarks.workloads import make_requests

    peaks = {"before": measure_matmul_peak()}
    print("matmul peak GFLOP/s, before the engines:", json.dumps(peaks["before"]))
    engines = []
    for engine, dtype in specs:
        python = args.vllm_python if engine == "vllm" else sys.executable
        if engine == "vllm" and not python:
            print("skipping vllm: pass --vllm-python", file=sys.stderr)
            continue
        engines.append(EngineProcess(engine, dtype, python, args))
    rounds: dict[tuple[int, str], list[dict]] = {(i, w): [] for i in range(len(engines))
                                                 for w in args.workload}
    progress = tqdm(total=args.rounds * len(args.workload) * len(engines), unit="run",
                    desc="engine runs", disable=args.disable_tqdm)
    try:
        for round_index in range(args.rounds):
            for workload in args.workload:
                for k in range(len(engines)):
                    i = (k + round_index) % len(engines)
                    rounds[i, workload].append(engines[i].run(workload, round_index))
                    progress.update(1)
            if round_index + 1 < args.rounds:
                peaks[f"after round {round_index + 1}"] = measure_matmul_peak()
    finally:
        progress.close()
        for e in engines:
            e.close()
    rows = [summarize(e.engine, e.dtype, w, e.ready, rounds[i, w])
            for i, e in enumerate(engines) for w in args.workload]
    peaks["after"] = measure_matmul_peak()
    print("matmul peak GFLOP/s, after the engines:", json.dumps(peaks["after"]))
    best_rate = max(rate for when in peaks.values() for entry in when.values()
                    for rate in entry.values())
    limits = {}
    for workload in args.workload:
        requests = make_requests(workload, args.num_requests)
        seconds = workload_flops(config_dir, requests) / (best_rate * 1e9)
        if workload != "single":  # one request is memory-bound, not compute-bound
            limits[workload] = sum(r.output_len for r in requests) / seconds
    print()
    print(f"matmul peak (best path, GFLOP/s): {best_rate:.0f}; arithmetic limits (output tok/s): "
          + ", ".join(f"{k} {v:.0f}" for k, v in limits.items()))
    print_table(rows, limits)
    print_rounds(rows)
    out = Path(args.output_json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(
        {"model": args.model, "quantization": args.quantization,
         "kv_cache_dtype": args.kv_cache_dtype, "matmul_peak_gflops": peaks,
         "arithmetic_limit_output_tok_s": limits, "results": rows},
        indent=2))
    print(f"\nwrote {out}")
    return 0 if any("error" not in r for r in rows) else 1


def main(argv: list[str] | None = None) -> int:
    from pagedllm.benchmarks.cli import run_standalone

    return run_standalone(sys.modules[__name__], argv)


if __name__ == "__main__":
    sys.exit(main())
