"""Hosts one engine for `pagedllm bench throughput`: starts it once, then runs the workloads it
is sent. Run as `python -m pagedllm.benchmarks.throughput_runner` by throughput.py, never by hand.

Protocol: commands "<workload> <round>" arrive one per line on stdin (the round picks the
prompts: workloads.round_requests); after start-up (and one warm-up token) and after every
workload, one JSON line goes to the file descriptor given by --result-fd (not stdout, where
engines log). The engine stays loaded between workloads, so throughput.py can interleave
engines round by round on a noisy machine.

It must also run under a vLLM virtualenv, where pagedllm is not installed (throughput.py puts
a folder holding only this package on its PYTHONPATH: package_path.py), so it imports nothing
of pagedllm beyond `pagedllm.benchmarks.workloads` (numpy) unless it hosts pagedllm itself.
"""

from __future__ import annotations

import time

PROCESS_START = time.perf_counter()

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import resource  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

from pagedllm.benchmarks.workloads import WORKLOADS, BenchRequest, round_requests  # noqa: E402


def peak_rss_gib() -> float:
    """Peak RSS of this process and its live descendants, summed: vLLM runs its model (and its
    KV cache) in worker processes of its own."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    try:
        import psutil
    except ImportError:
        return peak / 2**30
    for child in psutil.Process().children(recursive=True):
        try:
            status = Path(f"/proc/{child.pid}/status").read_text()
        except OSError:
            continue  # exited meanwhile
        for line in status.splitlines():
            if line.startswith("VmHWM:"):
                peak += int(line.split()[1]) * 1024
    return peak / 2**30


def _warm_prompt() -> list[int]:
    return list(range(1000, 1016))


class OfflineAPIEngine:
    """pagedllm and vLLM share the offline API: one generate over every request of a workload."""

    def __init__(self, llm, sampling_params_cls) -> None:
        self.llm = llm
        self.params_cls = sampling_params_cls

    def first_token(self) -> None:
        params = self.params_cls(temperature=0, max_tokens=1, ignore_eos=True)
        self.llm.generate([{"prompt_token_ids": _warm_prompt()}], params, use_tqdm=False)

    def run(self, requests) -> tuple[float, int]:
        prompts = [{"prompt_token_ids": r.prompt_token_ids} for r in requests]
        params = [self.params_cls(temperature=0, max_tokens=r.output_len, ignore_eos=True)
                  for r in requests]
        start = time.perf_counter()
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        elapsed = time.perf_counter() - start
        return elapsed, sum(len(o.outputs[0].token_ids) for o in outputs)


def load_pagedllm(args: argparse.Namespace) -> OfflineAPIEngine:
    from pagedllm import LLM, SamplingParams

    return OfflineAPIEngine(LLM(args.model, dtype=args.dtype, quantization=args.quantization,
                                kv_cache_dtype=args.kv_cache_dtype,
                                tensor_parallel_size=args.tensor_parallel_size), SamplingParams)


def load_vllm(args: argparse.Namespace) -> OfflineAPIEngine:
    from vllm import LLM, SamplingParams

    # On CPU this fraction reserves host memory; vLLM's 0.92 default fails next to other processes.
    llm = LLM(model=args.model, dtype=args.dtype, seed=0, gpu_memory_utilization=0.5)
    return OfflineAPIEngine(llm, SamplingParams)


class TransformersStatic:
    """Static batching: left padding, each batch generates its longest requested output.

    Requests are sorted by prompt length to limit padding; only requested tokens count. The
    best of the batch sizes tried is kept (the others are reported on stderr).
    """

    def __init__(self, model: str, dtype: str, batch_sizes=(32, 64)) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        self.torch = torch
        self.hf = AutoModelForCausalLM.from_pretrained(model, dtype=getattr(torch, dtype)).eval()
        self.hf.generation_config.eos_token_id = None
        self.batch_sizes = batch_sizes

    def _generate(self, batch) -> None:
        torch = self.torch
        width = max(len(r.prompt_token_ids) for r in batch)
        ids = torch.tensor([[0] * (width - len(r.prompt_token_ids)) + r.prompt_token_ids
                            for r in batch])
        mask = (torch.arange(width)[None, :]
                >= torch.tensor([width - len(r.prompt_token_ids) for r in batch])[:, None])
        new = max(r.output_len for r in batch)
        with torch.inference_mode():
            self.hf.generate(ids, attention_mask=mask.long(), max_new_tokens=new,
                             min_new_tokens=new, do_sample=False, pad_token_id=0)

    def first_token(self) -> None:
        self._generate([BenchRequest(_warm_prompt(), 1)])

    def run(self, requests) -> tuple[float, int]:
        ordered = sorted(requests, key=lambda r: len(r.prompt_token_ids))
        best = None
        for batch_size in sorted({min(b, len(requests)) for b in self.batch_sizes}):
            start = time.perf_counter()
            for i in range(0, len(ordered), batch_size):
                self._generate(ordered[i : i + batch_size])
            elapsed = time.perf_counter() - start
            print(f"transformers batch {batch_size}: {elapsed:.1f} s", file=sys.stderr)
            best = elapsed if best is None else min(best, elapsed)
        return best, sum(r.output_len for r in requests)


def load_transformers(args: argparse.Namespace) -> TransformersStatic:
    return TransformersStatic(args.model, args.dtype, tuple(args.transformers_batch_sizes))


LOADERS = {"pagedllm": load_pagedllm, "vllm": load_vllm, "transformers": load_transformers}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--engine", required=True, choices=sorted(LOADERS))
    parser.add_argument("--model", required=True)
    parser.add_argument("--dtype", required=True)
    parser.add_argument("--tensor-parallel-size", type=int, default=1)
    parser.add_argument("--quantization", default="none")
    parser.add_argument("--kv-cache-dtype", default="auto")
    parser.add_argument("--num-requests", type=int, default=0)
    parser.add_argument("--transformers-batch-sizes", type=int, nargs="+", default=[32, 64])
    parser.add_argument("--result-fd", type=int, required=True)
    args = parser.parse_args()
    results = os.fdopen(args.result_fd, "w", buffering=1)
    engine = LOADERS[args.engine](args)
    startup = time.perf_counter() - PROCESS_START
    engine.first_token()
    first_token = time.perf_counter() - PROCESS_START
    results.write(json.dumps({"startup_s": startup, "first_token_s": first_token}) + "\n")
    for line in sys.stdin:  # "<workload> <round>"
        workload, _, round_index = line.strip().partition(" ")
        if workload not in WORKLOADS or not round_index.isdigit():
            results.write(json.dumps({"error": f"bad command {line.strip()!r}"}) + "\n")
            continue
        requests = round_requests(workload, args.num_requests, int(round_index))
        elapsed, num_output = engine.run(requests)
        num_prompt = sum(len(r.prompt_token_ids) for r in requests)
        results.write(json.dumps({
            "num_requests": len(requests),
            "prompt_tokens": num_prompt,
            "output_tokens": num_output,
            "elapsed_s": elapsed,
            "peak_rss_gib": peak_rss_gib(),
        }) + "\n")


if __name__ == "__main__":
    main()
