"""The native decoder stack against the per-module path, side by side in one process.

One LLM is loaded (any model, dtype and quantization, e.g. the shipped SmolLM2 GGUF with
--quantization auto); then, for each of --rounds rounds, each workload runs once with the
model's native stack and once on the module path (the stack set aside; the order alternates
each round), with the same lengths (fresh prompt ids each run, as `bench throughput`). Each
row is the median round; the ratio is taken per round.

    python -m pagedllm.benchmarks.native_stack --quantization auto --dtype bfloat16 \
        --workload fixed single --rounds 3

Prints a table and writes JSON to --output-json (default
benchmarks/results/native_stack.json under the working directory).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from pagedllm.benchmarks.workloads import WORKLOADS
from pagedllm.benchmarks.workloads import round_requests as _round_requests

PATHS = ("stack", "module")


def add_cli_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="model directory or .gguf (default: "
                                                      "the shipped SmolLM2)")
    parser.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16"))
    parser.add_argument("--quantization", default="none",
                        help="none, auto (a .gguf keeps its blocks), int8, gguf")
    parser.add_argument("--workload", nargs="+", default=["fixed", "single"],
                        choices=sorted(WORKLOADS))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--output-json", default=str(Path("benchmarks", "results",
                                                          "native_stack.json")))


def check_args(args: argparse.Namespace) -> None:
    if args.rounds < 1:
        raise ValueError(f"--rounds must be >= 1, got {args.rounds}")


def _generate(llm, requests) -> tuple[float, int]:
    from pagedllm import SamplingParams

    prompts = [{"prompt_token_ids": r.prompt_token_ids} for r in requests]
    params = [SamplingParams(temperature=0, max_tokens=r.output_len, ignore_eos=True)
              for r in requests]
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    return time.perf_counter() - start, sum(len(o.outputs[0].token_ids) for o in outputs)


def run(args: argparse.Namespace) -> int:
    from pagedllm import LLM

    kwargs = {} if args.model is None else {"model": args.model}
    llm = LLM(**kwargs, dtype=args.dtype, quantization=args.quantization)
    model = llm.llm_engine.worker.model
    stack = getattr(model, "native_stack", None)
    if stack is None:
        print(f"{type(model).__name__} has no native stack here: nothing to compare",
              file=sys.stderr)
        return 1
    _generate(llm, round_requests("single", 0, 99))  # warm-up
    results = {w: {p: [] for p in PATHS} for w in args.workload}
    for r in range(args.rounds):
        for workload in args.workload:
            for i, path in enumerate(PATHS if r % 2 == 0 else PATHS[::-1]):
                # Fresh prompt ids for each run: the prefix cache cannot serve the second.
                requests = round_requests(workload, 2 * r + i, 0)
                model.native_stack = stack if path == "stack" else None
                seconds, tokens = _generate(llm, requests)
                results[workload][path].append(tokens / seconds)
                print(f"round {r} {workload} {path}: {tokens / seconds:.1f} out tok/s",
                      file=sys.stderr)
    model.native_stack = stack
    rows = []
    print(f"\n{type(model).__name__}, {args.dtype}, quantization={args.quantization}, "
          f"linear path {stack.linear_path(1)}")
    print("| workload | module path out tok/s | native stack out tok/s | stack / module "
          "(median) | per round |")
    print("|---|---|---|---|---|")
    for workload, by_path in results.items():
        ratios = [s / m for s, m in zip(by_path["stack"], by_path["module"])]
        row = {"workload": workload, "module": statistics.median(by_path["module"]),
               "stack": statistics.median(by_path["stack"]),
               "ratio": statistics.median(ratios), "rounds": by_path}
        rows.append(row)
        print(f"| {workload} | {row['module']:.1f} | {row['stack']:.1f} | {row['ratio']:.2f}x | "
              f"{', '.join(f'{x:.2f}' for x in ratios)} |")
    out = Path(args.output_json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"model": args.model, "dtype": args.dtype,
                               "quantization": args.quantization, "rows": rows}, indent=1))
    return 0


def round_requests(workload: str, round_index: int, salt: int):
    return _round_requests(workload, None, round_index + 1000 * salt)


def main(argv: list[str] | None = None) -> int:
    from pagedllm.benchmarks.cli import run_standalone

    return run_standalone(sys.modules[__name__], argv)


if __name__ == "__main__":
    raise SystemExit(main())
