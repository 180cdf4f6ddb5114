"""End-to-end latency of one batch, like `vllm bench latency`, through the public `LLM` API.

A batch of --batch-size requests, each --input-len random prompt tokens and --output-len
generated tokens (greedy, ignore_eos), goes through one `LLM.generate` call; --num-iters-warmup
untimed calls come first, then --num-iters timed ones. It prints the mean and the percentiles
(p10, p25, p50, p75, p90, p99) of the batch latency as a table and writes them as JSON to
--output-json (default benchmarks/results/latency.json under the working directory), with the
keys vLLM's JSON has (avg_latency, latencies, percentiles).

NOTE: every call draws new prompt ids (same lengths, seeded), where vLLM's sends the same ones
each time: with prefix caching on, a repeated prompt's prefill would be served from the cache.

    pagedllm bench latency                                  # 8 x (32 in + 128 out), 10 + 30 calls
    pagedllm bench latency --batch-size 1 --input-len 128 --output-len 128 --num-iters 5
    pagedllm bench latency --model DIR --dtype float32 --output-json lat.json

(or `python -m pagedllm.benchmarks.latency ...`).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from pagedllm.benchmarks.cli import run_standalone
from pagedllm.benchmarks.workloads import random_prompt
from pagedllm.config import EngineConfig

RESULTS = Path("benchmarks", "results")  # under the working directory, not the package
PERCENTILES = (10, 25, 50, 75, 90, 99)


def add_cli_args(parser: argparse.ArgumentParser) -> None:
    """The flags of `pagedllm bench latency`: the workload's, then every engine setting's
    (EngineConfig's; --seed is the prompts' seed here, the sampler's does not matter greedy)."""
    parser.add_argument("--input-len", type=int, default=32, help="prompt tokens per request")
    parser.add_argument("--output-len", type=int, default=128,
                        help="generated tokens per request")
    parser.add_argument("--batch-size", type=int, default=8, help="requests per call")
    parser.add_argument("--num-iters-warmup", type=int, default=10,
                        help="untimed calls before the timed ones")
    parser.add_argument("--num-iters", type=int, default=30, help="timed calls")
    parser.add_argument("--seed", type=int, default=0, help="seed of the prompt ids")
    parser.add_argument("--output-json", default=str(RESULTS / "latency.json"),
                        help="where the results go (default: %(default)s)")
    parser.add_argument("--disable-tqdm", action="store_true", help="no progress bars")
    EngineConfig.add_cli_args(parser, skip=("seed",))


def check_args(args: argparse.Namespace) -> None:
    """ValueError naming a flag out of range."""
    for name in ("input_len", "output_len", "batch_size", "num_iters"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1")
    if args.num_iters_warmup < 0:
        raise ValueError("--num-iters-warmup must be at least 0")


def engine_kwargs(args: argparse.Namespace) -> dict:
    """The `LLM` keyword arguments of the flags."""
    kwargs = EngineConfig.kwargs_from_cli_args(args)
    del kwargs["seed"]  # the prompts' seed
    return kwargs


def summarize(latencies: list[float], num_output: int) -> dict:
    """Mean and percentiles of the calls' latencies (seconds), and output tokens per second of
    a call that generates `num_output` tokens in the mean latency."""
    arr = np.asarray(latencies)
    return {
        "avg_latency": float(arr.mean()),
        "latencies": [float(x) for x in arr],
        "percentiles": {str(p): float(np.percentile(arr, p)) for p in PERCENTILES},
        "avg_output_tokens_per_s": num_output / float(arr.mean()),
    }


def print_table(result: dict, num_output: int) -> None:
    header = f"{'latency':<8} {'seconds':>9} {'output tok/s':>13}"
    print(header)
    print("-" * len(header))
    rows = [("avg", result["avg_latency"])]
    rows += [(f"p{p}", s) for p, s in result["percentiles"].items()]
    for name, seconds in rows:
        print(f"{name:<8} {seconds:>9.3f} {num_output / seconds:>13.1f}")


def run(args: argparse.Namespace) -> int:
    """Runs the benchmark of parsed flags (add_cli_args); prints the table, writes the JSON."""
    check_args(args)
    from pagedllm import LLM, SamplingParams

    start = time.perf_counter()
    llm = LLM(**engine_kwargs(args))
    print(f"engine ready in {time.perf_counter() - start:.1f} s")
    vocab_size = llm.llm_engine.hf_config.vocab_size
    params = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True)
    rng = np.random.default_rng(args.seed)

    def one_call() -> tuple[float, int]:
        prompts = [{"prompt_token_ids": random_prompt(rng, args.input_len, vocab_size)}
                   for _ in range(args.batch_size)]
        start = time.perf_counter()
        outputs = llm.generate(prompts, params, use_tqdm=False)
        elapsed = time.perf_counter() - start
        return elapsed, sum(len(o.outputs[0].token_ids) for o in outputs)

    for _ in tqdm(range(args.num_iters_warmup), desc="warm-up", disable=args.disable_tqdm):
        one_call()
    calls = [one_call() for _ in tqdm(range(args.num_iters), desc="timed calls",
                                      disable=args.disable_tqdm)]
    num_output = round(np.mean([n for _, n in calls]))
    if num_output != args.batch_size * args.output_len:  # ignore_eos: only max_model_len stops
        print(f"NOTE: calls generated {num_output} tokens on average, not "
              f"{args.batch_size * args.output_len} (the model's context is too short?)")
    result = summarize([s for s, _ in calls], num_output)
    print(f"\nlatency of one call: {args.batch_size} requests x ({args.input_len} prompt + "
          f"{args.output_len} output tokens), {args.num_iters} calls after "
          f"{args.num_iters_warmup} warm-up")
    print_table(result, num_output)
    config = {**engine_kwargs(args), "input_len": args.input_len,
              "output_len": args.output_len, "batch_size": args.batch_size,
              "num_iters_warmup": args.num_iters_warmup, "num_iters": args.num_iters,
              "seed": args.seed}
    out = Path(args.output_json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"config": config, **result}, indent=2))
    print(f"\nwrote {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_standalone(sys.modules[__name__], argv)


if __name__ == "__main__":
    sys.exit(main())
