"""Runs one engine on one workload and writes its measurements as JSON (see throughput.py).

It must also run under a vLLM virtualenv, so it imports only what that engine needs.
"""

from __future__ import annotations

import time

PROCESS_START = time.perf_counter()

import argparse  # noqa: E402
import json  # noqa: E402
import resource  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from workloads import WORKLOADS  # noqa: E402


def _run_vllm_style(llm, sampling_params_cls, requests) -> tuple[float, float, int]:
    """pagedllm and vLLM share the offline API: time one generate over every request."""
    ready = time.perf_counter()
    prompts = [{"prompt_token_ids": r.prompt_token_ids} for r in requests]
    params = [sampling_params_cls(temperature=0, max_tokens=r.output_len, ignore_eos=True)
              for r in requests]
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    return ready - PROCESS_START, elapsed, sum(len(o.outputs[0].token_ids) for o in outputs)


def run_pagedllm(model: str, dtype: str, requests) -> tuple[float, float, int]:
    from pagedllm import LLM, SamplingParams

    return _run_vllm_style(LLM(model, dtype=dtype), SamplingParams, requests)


def run_vllm(model: str, dtype: str, requests) -> tuple[float, float, int]:
    from vllm import LLM, SamplingParams

    # On CPU this fraction reserves host memory; vLLM's 0.92 default fails next to other processes.
    llm = LLM(model=model, dtype=dtype, seed=0, gpu_memory_utilization=0.5)
    return _run_vllm_style(llm, SamplingParams, requests)


def run_transformers(model: str, dtype: str, requests, batch_sizes=(32, 64)):
    """Static batching: left padding, each batch generates its longest requested output.

    Requests are sorted by prompt length to limit padding; only requested tokens count. The
    best batch size is kept (the others are reported on stderr).
    """
    import torch
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model, dtype=getattr(torch, dtype)).eval()
    hf.generation_config.eos_token_id = None
    ready = time.perf_counter()
    ordered = sorted(requests, key=lambda r: len(r.prompt_token_ids))
    best = None
    for batch_size in batch_sizes:
        start = time.perf_counter()
        with torch.inference_mode():
            for i in range(0, len(ordered), batch_size):
                batch = ordered[i : i + batch_size]
                width = max(len(r.prompt_token_ids) for r in batch)
                ids = torch.tensor([[0] * (width - len(r.prompt_token_ids)) + r.prompt_token_ids
                                    for r in batch])
                mask = (torch.arange(width)[None, :]
                        >= torch.tensor([width - len(r.prompt_token_ids) for r in batch])[:, None])
                new = max(r.output_len for r in batch)
                hf.generate(ids, attention_mask=mask.long(), max_new_tokens=new,
                            min_new_tokens=new, do_sample=False, pad_token_id=0)
        elapsed = time.perf_counter() - start
        print(f"transformers batch {batch_size}: {elapsed:.1f} s", file=sys.stderr)
        if best is None or elapsed < best:
            best = elapsed
    return ready - PROCESS_START, best, sum(r.output_len for r in requests)


RUNNERS = {"pagedllm": run_pagedllm, "vllm": run_vllm, "transformers": run_transformers}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--engine", required=True, choices=sorted(RUNNERS))
    parser.add_argument("--workload", required=True, choices=sorted(WORKLOADS))
    parser.add_argument("--model", required=True)
    parser.add_argument("--dtype", required=True)
    parser.add_argument("--num-requests", type=int, default=0)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    kwargs = {"num_requests": args.num_requests} if args.num_requests else {}
    requests = WORKLOADS[args.workload](**kwargs)
    startup, elapsed, num_output = RUNNERS[args.engine](args.model, args.dtype, requests)
    num_prompt = sum(len(r.prompt_token_ids) for r in requests)
    result = {
        "engine": args.engine,
        "workload": args.workload,
        "num_requests": len(requests),
        "prompt_tokens": num_prompt,
        "output_tokens": num_output,
        "elapsed_s": elapsed,
        "requests_per_s": len(requests) / elapsed,
        "output_tokens_per_s": num_output / elapsed,
        "total_tokens_per_s": (num_prompt + num_output) / elapsed,
        "startup_s": startup,
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
    }
    Path(args.out).write_text(json.dumps(result))
    print(json.dumps(result), file=sys.stderr)


if __name__ == "__main__":
    main()
