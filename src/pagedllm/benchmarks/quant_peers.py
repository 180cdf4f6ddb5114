"""pagedllm's quantized paths beside llama.cpp on the shipped SmolLM2 GGUF, in one run.

llama.cpp's own tools (built from the source in the llama-cpp-python sdist, see
docs/benchmarks.md) on the file as it is:
- `llama-bench -p 0 -n 128 -t T`: single-stream decode, generated tokens/s;
- `llama-batched-bench -npp 128 -ntg 128 -npl 64 -t T`: 64 parallel sequences of 128 prompt
  and 128 generated tokens: output tokens/s over the whole workload (prompt processing
  included) and during generation alone.
pagedllm, each configuration in its own process (greedy, ignore_eos, T threads):
- single stream: one 128-token prompt, 128 generated tokens; decode tokens/s = 127 / (time for
  128 tokens - time for 1), and output tokens/s over the whole request;
- the fixed workload (64 x 128/128, benchmarks/workloads.py, the one `pagedllm bench
  throughput` runs): output tokens/s over the whole workload, best of --rounds.
Configurations: the GGUF on its quantized kernels (quantization="auto"), the same file
dequantized (quantization="none"), and the dense directory converted from it with
quantization="int8" and dense bf16.

    python -m pagedllm.benchmarks.quant_peers --llama-cpp-bin /work/llama.cpp-build/bin

Prints a table and writes JSON to --output-json (benchmarks/results/quant_peers.json).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path("benchmarks", "results")
# name -> (model: "gguf" or "dense", quantization, dtype)
CONFIGS = {
    "gguf-quantized": ("gguf", "auto", "bfloat16"),
    "gguf-dequantized-bf16": ("gguf", "none", "bfloat16"),
    "int8": ("dense", "int8", "bfloat16"),
    "dense-bf16": ("dense", "none", "bfloat16"),
}


def llama_bench(bin_dir: Path, model: Path, threads: int) -> dict:
    out = subprocess.run([str(bin_dir / "llama-bench"), "-m", str(model), "-p", "0", "-n", "128",
                          "-t", str(threads), "-o", "json"], capture_output=True, text=True,
                         check=True).stdout
    runs = json.loads(out)
    return {"decode_tok_s": runs[0]["avg_ts"], "stddev_tok_s": runs[0]["stddev_ts"],
            "build": runs[0].get("build_commit")}


def llama_batched_bench(bin_dir: Path, model: Path, threads: int) -> dict:
    out = subprocess.run([str(bin_dir / "llama-batched-bench"), "-m", str(model), "-c", "16384",
                          "-npp", "128", "-ntg", "128", "-npl", "64", "-t", str(threads)],
                         capture_output=True, text=True, check=True)
    # |    PP |     TG |    B |   N_KV |   T_PP s | S_PP t/s |   T_TG s | S_TG t/s |      T s |    S t/s |
    for line in out.stdout.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 10 and cells[0] == "128" and re.fullmatch(r"\d+", cells[2]):
            _, s_pp, _, s_tg, t_all, s_all = map(float, cells[4:])
            generated = 128 * int(cells[2])
            return {"prompt_tok_s": s_pp, "generation_tok_s": s_tg, "total_tok_s": s_all,
                    "output_tok_s": generated / t_all, "seconds": t_all}
    raise RuntimeError(f"no result row in llama-batched-bench's output:\n{out.stdout}\n"
                       f"{out.stderr[-2000:]}")


def pagedllm_child(model: str, quantization: str, dtype: str, rounds: int) -> dict:
    """Runs in its own process: single stream and the fixed workload on one configuration."""
    from pagedllm import LLM, SamplingParams
    from pagedllm.benchmarks.workloads import round_requests

    start = time.perf_counter()
    llm = LLM(model, quantization=quantization, dtype=dtype, seed=0)
    ready_s = time.perf_counter() - start

    def run(requests, max_tokens=None) -> tuple[float, int]:
        prompts = [{"prompt_token_ids": r.prompt_token_ids} for r in requests]
        params = [SamplingParams(temperature=0, max_tokens=max_tokens or r.output_len,
                                 ignore_eos=True) for r in requests]
        t0 = time.perf_counter()
        outputs = llm.generate(prompts, params, use_tqdm=False)
        return time.perf_counter() - t0, sum(len(o.outputs[0].token_ids) for o in outputs)

    run(round_requests("single", None, 0), 8)  # warm-up
    single, decode, fixed = [], [], []
    for i in range(rounds):
        # Fresh prompts each round (round_requests), so no round reuses cached prefixes.
        one = round_requests("single", None, 1 + 2 * i)
        t1, _ = run(round_requests("single", None, 2 + 2 * i), 1)
        t128, n = run(one)
        single.append(n / t128)
        decode.append((n - 1) / max(t128 - t1, 1e-9))
        t, n = run(round_requests("fixed", None, i))
        fixed.append(n / t)
    return {"ready_s": ready_s, "single_output_tok_s": max(single),
            "single_decode_tok_s": max(decode), "fixed_output_tok_s": max(fixed),
            "rounds": {"single": single, "decode": decode, "fixed": fixed}}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--llama-cpp-bin", default="/work/llama.cpp-build/bin",
                        help="folder with llama-bench and llama-batched-bench")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--output-json", default=str(RESULTS / "quant_peers.json"))
    parser.add_argument("--child", nargs=3, metavar=("MODEL", "QUANTIZATION", "DTYPE"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(pagedllm_child(*args.child, args.rounds)))
        return {}
    from pagedllm.models.default_model import default_gguf_path, resolve_model_path

    gguf = default_gguf_path()
    models = {"gguf": str(gguf), "dense": str(resolve_model_path(None))}
    results: dict = {"threads": args.threads, "model": str(gguf), "llama.cpp": {},
                     "pagedllm": {}}
    bin_dir = Path(args.llama_cpp_bin)
    if (bin_dir / "llama-bench").exists():
        results["llama.cpp"]["llama-bench"] = llama_bench(bin_dir, gguf, args.threads)
        print("llama-bench", results["llama.cpp"]["llama-bench"], flush=True)
        results["llama.cpp"]["batched-bench"] = llama_batched_bench(bin_dir, gguf, args.threads)
        print("llama-batched-bench", results["llama.cpp"]["batched-bench"], flush=True)
    else:
        print(f"no llama.cpp tools in {bin_dir}: pagedllm only", flush=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    for name in args.configs.split(","):
        model, quantization, dtype = CONFIGS[name]
        proc = subprocess.run([sys.executable, "-m", "pagedllm.benchmarks.quant_peers",
                               "--rounds", str(args.rounds), "--child", models[model],
                               quantization, dtype], capture_output=True, text=True, env=env,
                              check=False)
        if proc.returncode:
            results["pagedllm"][name] = {"error": proc.stderr[-2000:]}
        else:
            results["pagedllm"][name] = json.loads(proc.stdout.strip().splitlines()[-1])
        print(name, results["pagedllm"][name], flush=True)
    print(f"\n{'engine':<34} {'single decode':>14} {'single out':>11} {'fixed out':>10}")
    lb, bb = results["llama.cpp"].get("llama-bench"), results["llama.cpp"].get("batched-bench")
    if lb and bb:
        print(f"{'llama.cpp Q4_1':<34} {lb['decode_tok_s']:>14.1f} {'':>11} "
              f"{bb['output_tok_s']:>10.1f}   (generation alone {bb['generation_tok_s']:.1f})")
    for name, r in results["pagedllm"].items():
        if "error" in r:
            print(f"{'pagedllm ' + name:<34} error")
            continue
        print(f"{'pagedllm ' + name:<34} {r['single_decode_tok_s']:>14.1f} "
              f"{r['single_output_tok_s']:>11.1f} {r['fixed_output_tok_s']:>10.1f}")
    out = Path(args.output_json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
