"""The PagedAttention paper's memory measurements, on the shipped SmolLM2 with real engine runs.

1. KV memory waste: the share of reserved KV memory that holds real tokens, for pagedllm's
   on-demand blocks and, over the same schedule, the reservation policies of earlier systems
   (the model's max length per request, the next power of two of the true length, exactly the
   true length).
2. Memory saved by sharing: parallel sampling (n = 2, 4, 6) and beam search (width 2, 4, 6).
3. Prefix caching: throughput with a shared 1-shot and 5-shot prefix, caching on versus off.
4. Swap versus recompute preemption under the same memory pressure, block sizes 8 to 64.

    python -m pagedllm.benchmarks.memory            # under 10 minutes on 2 cores
    python -m pagedllm.benchmarks.memory --quick    # half the sizes
Prints tables, writes benchmarks/results/memory.json and PNG charts in docs/images/ (both under
the working directory; --out and --images name others).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from pagedllm import LLM, BeamSearchParams, SamplingParams
from pagedllm.benchmarks.workloads import sharegpt_like_workload
from pagedllm.models.default_model import resolve_model_path

RESULTS = Path("benchmarks", "results")  # under the working directory, not the package


def engine(model: str, **kwargs) -> LLM:
    kwargs.setdefault("num_kv_blocks", 4096)
    return LLM(model, **kwargs)


def step_all(llm: LLM, on_step=None, max_steps: int | None = None) -> int:
    steps = 0
    engine_ = llm.llm_engine
    while engine_.has_unfinished_requests() and (max_steps is None or steps < max_steps):
        engine_.step()
        steps += 1
        if on_step:
            on_step(engine_)
    engine_.abort_request(list(engine_.scheduler.requests))
    return steps


# ---- 1. waste -------------------------------------------------------------------------------

def measure_waste(model: str, num_requests: int, max_steps: int) -> dict:
    """Runs a ShareGPT-like trace and, each step, compares the slots reserved by each policy for
    the requests running at that moment with the tokens they really hold."""
    # NOTE: a 2048-token context, as the paper's OPT models have (SmolLM2's is 8192).
    llm = engine(model, block_size=16, max_model_len=2048)
    max_len = llm.llm_engine.max_model_len
    requests = sharegpt_like_workload(num_requests=num_requests, mean_input=160,
                                      mean_output=300, max_total=2048, seed=1)
    totals = {"tokens": 0, "pagedllm": 0, "Max": 0, "Pow2": 0, "Oracle": 0}
    final_len = {}
    for i, r in enumerate(requests):
        llm.llm_engine.add_request(str(i), {"prompt_token_ids": r.prompt_token_ids},
                                   SamplingParams(temperature=0, max_tokens=r.output_len,
                                                  ignore_eos=True))
        final_len[str(i)] = len(r.prompt_token_ids) + r.output_len

    def on_step(eng):
        running = eng.scheduler.running
        totals["tokens"] += sum(s.num_computed_tokens for r in running for s in r.live_seqs())
        totals["pagedllm"] += eng.block_manager.num_slots_reserved()
        for r in running:
            true_len = final_len[r.request_id]
            totals["Max"] += max_len
            totals["Pow2"] += 1 << (true_len - 1).bit_length()
            totals["Oracle"] += true_len

    steps = step_all(llm, on_step, max_steps)
    return {"steps": steps, "max_model_len": max_len,
            "real_token_share": {k: totals["tokens"] / totals[k]
                                 for k in ("Max", "Pow2", "Oracle", "pagedllm")}}


# ---- 2. sharing -----------------------------------------------------------------------------

def measure_sharing(model: str, kind: str, width: int, trace: str, num_requests: int,
                    max_steps: int) -> float:
    """Memory saved by sharing = 1 - physical blocks / logical blocks, averaged over steps."""
    llm = engine(model, block_size=16, enable_prefix_caching=False)
    if trace == "alpaca-like":
        requests = sharegpt_like_workload(num_requests=num_requests, mean_input=20,
                                          mean_output=60, max_total=256, seed=2)
    else:
        requests = sharegpt_like_workload(num_requests=num_requests, mean_input=160,
                                          mean_output=300, max_total=1024, seed=2)
    eng = llm.llm_engine
    for i, r in enumerate(requests):
        prompt = {"prompt_token_ids": r.prompt_token_ids}
        if kind == "parallel":
            eng.add_request(str(i), prompt, SamplingParams(n=width, temperature=1.0, seed=i,
                                                           max_tokens=r.output_len,
                                                           ignore_eos=True))
        else:
            eng.add_beam_search_request(str(i), prompt, BeamSearchParams(
                beam_width=width, max_tokens=r.output_len, ignore_eos=True))
    physical, logical = [0], [0]

    def on_step(e):
        stats = e.get_stats()
        physical[0] += stats.num_blocks - stats.num_free_blocks
        logical[0] += stats.num_logical_blocks

    step_all(llm, on_step, max_steps)
    return 1 - physical[0] / logical[0]


# ---- 3. prefix caching ----------------------------------------------------------------------

def measure_prefix(model: str, shots: int, num_requests: int) -> dict:
    rng = np.random.default_rng(shots)
    shot_len = 80
    prefix = rng.integers(100, 40000, shots * shot_len).tolist()
    prompts = [{"prompt_token_ids": prefix + rng.integers(100, 40000, 24).tolist()}
               for _ in range(num_requests)]
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    result = {}
    for caching in (False, True):
        llm = engine(model, enable_prefix_caching=caching)
        llm.generate(prompts[:1], params, use_tqdm=False)  # warm-up (fills the cache if on)
        start = time.perf_counter()
        llm.generate(prompts[1:], params, use_tqdm=False)
        elapsed = time.perf_counter() - start
        stats = llm.llm_engine.get_stats()
        result["on" if caching else "off"] = {
            "requests_per_s": (num_requests - 1) / elapsed,
            "prefix_hit_rate": stats.prefix_cache_hits / max(stats.prefix_cache_queries, 1),
        }
    result["speedup"] = result["on"]["requests_per_s"] / result["off"]["requests_per_s"]
    return result


# ---- 4. swap versus recompute ---------------------------------------------------------------

def measure_preemption(model: str, block_size: int, mode: str, num_requests: int) -> dict:
    requests = sharegpt_like_workload(num_requests=num_requests, mean_input=60,
                                      mean_output=48, max_total=192, seed=3)
    tokens_capacity = 448  # room for about a third of the requests at once
    llm = engine(model, block_size=block_size, num_kv_blocks=tokens_capacity // block_size,
                 preemption_mode=mode, swap_space=1.0, enable_prefix_caching=False)
    prompts = [{"prompt_token_ids": r.prompt_token_ids} for r in requests]
    params = [SamplingParams(temperature=0, max_tokens=r.output_len, ignore_eos=True)
              for r in requests]
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    stats = llm.llm_engine.get_stats()
    return {"seconds": elapsed,
            "output_tokens_per_s": sum(len(o.outputs[0].token_ids) for o in outputs) / elapsed,
            "preemptions": stats.num_preemptions, "swap_outs": stats.num_swap_outs,
            "tokens_computed": stats.num_tokens_computed}


def bar_chart(path: Path, title: str, labels: list[str], series: dict[str, list[float]],
              ylabel: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    width = 0.8 / len(series)
    for i, (name, values) in enumerate(series.items()):
        xs = np.arange(len(labels)) + i * width
        ax.bar(xs, values, width, label=name)
        for x, v in zip(xs, values):
            ax.text(x, v, f"{v:.1f}", ha="center", va="bottom", fontsize=7)
    ax.set_xticks(np.arange(len(labels)) + width * (len(series) - 1) / 2, labels)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if len(series) > 1:
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller runs")
    parser.add_argument("--model", default=None)
    parser.add_argument("--parts", default="1,2,3,4", help="which measurements, e.g. 1,3")
    parser.add_argument("--out", default=str(RESULTS / "memory.json"))
    parser.add_argument("--images", default=str(Path("docs", "images")))
    args = parser.parse_args()
    model = args.model or str(resolve_model_path(None))
    # NOTE: the default sizes keep the whole run under 10 minutes on 2 cores.
    scale = 0.5 if not args.quick else 0.25
    images = Path(args.images)
    results: dict = {}
    parts = {int(p) for p in args.parts.split(",")}

    t0 = time.perf_counter()
    if 1 in parts:
        run_waste(model, scale, images, results)
    if 2 in parts:
        run_sharing(model, scale, images, results)
    if 3 in parts:
        run_prefix(model, scale, images, results)
    if 4 in parts:
        run_preemption(model, scale, images, results)
    results["total_seconds"] = time.perf_counter() - t0
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(f"\ntotal {results['total_seconds']:.0f} s; wrote {args.out} and charts in {images}")


def run_waste(model: str, scale: float, images: Path, results: dict) -> None:
    waste = measure_waste(model, num_requests=int(48 * scale), max_steps=int(160 * scale))
    results["waste"] = waste
    print(f"\n1. KV memory holding real tokens (ShareGPT-like trace, {waste['steps']} steps, "
          f"max_model_len {waste['max_model_len']})")
    print(f"{'policy':<10} {'real tokens / reserved':>24}")
    for policy, share in waste["real_token_share"].items():
        print(f"{policy:<10} {share:>23.1%}")
    bar_chart(images / "memory_waste.png", "KV memory holding real tokens",
              list(waste["real_token_share"]),
              {"%": [100 * v for v in waste["real_token_share"].values()]}, "% of reserved")


def run_sharing(model: str, scale: float, images: Path, results: dict) -> None:
    results["sharing"] = {}
    print("\n2. Memory saved by sharing (1 - physical / logical blocks)")
    print(f"{'trace':<14} {'kind':<10} {'width':>5} {'saved':>8}")
    for trace in ("alpaca-like", "sharegpt-like"):
        for kind in ("parallel", "beam"):
            for width in (2, 4, 6):
                saved = measure_sharing(model, kind, width, trace, num_requests=4,
                                        max_steps=int(60 * scale))
                results["sharing"][f"{trace}/{kind}/{width}"] = saved
                print(f"{trace:<14} {kind:<10} {width:>5} {saved:>7.1%}")
    for trace in ("alpaca-like", "sharegpt-like"):
        bar_chart(images / f"memory_sharing_{trace}.png", f"Memory saved by sharing ({trace})",
                  ["2", "4", "6"],
                  {kind: [100 * results["sharing"][f"{trace}/{kind}/{w}"] for w in (2, 4, 6)]
                   for kind in ("parallel", "beam")}, "% saved")


def run_prefix(model: str, scale: float, images: Path, results: dict) -> None:
    results["prefix"] = {}
    print("\n3. Prefix caching (shared few-shot prefix, 24-token questions, 16 output tokens)")
    print(f"{'prefix':<8} {'off req/s':>10} {'on req/s':>10} {'speedup':>8} {'hit rate':>9}")
    for shots in (1, 5):
        r = measure_prefix(model, shots, num_requests=int(32 * scale))
        results["prefix"][f"{shots}-shot"] = r
        print(f"{shots}-shot   {r['off']['requests_per_s']:>10.2f} "
              f"{r['on']['requests_per_s']:>10.2f} {r['speedup']:>7.2f}x "
              f"{r['on']['prefix_hit_rate']:>8.1%}")
    bar_chart(images / "memory_prefix.png", "Prefix caching speed-up", ["1-shot", "5-shot"],
              {"speedup": [results["prefix"][k]["speedup"] for k in ("1-shot", "5-shot")]},
              "x throughput")


def run_preemption(model: str, scale: float, images: Path, results: dict) -> None:
    results["preemption"] = {}
    print("\n4. Swap versus recompute (448 KV slots, short ShareGPT-like lengths)")
    print(f"{'block':>5} {'mode':<10} {'seconds':>8} {'out tok/s':>10} {'preempt':>8} "
          f"{'swap-outs':>9} {'tokens computed':>16}")
    for block_size in (8, 16, 32, 64):
        for mode in ("recompute", "swap"):
            r = measure_preemption(model, block_size, mode, num_requests=int(16 * scale))
            results["preemption"][f"{block_size}/{mode}"] = r
            print(f"{block_size:>5} {mode:<10} {r['seconds']:>8.1f} "
                  f"{r['output_tokens_per_s']:>10.1f} {r['preemptions']:>8} {r['swap_outs']:>9} "
                  f"{r['tokens_computed']:>16}")
    bar_chart(images / "memory_preemption.png", "Swap vs recompute", ["8", "16", "32", "64"],
              {mode: [results["preemption"][f"{b}/{mode}"]["output_tokens_per_s"]
                      for b in (8, 16, 32, 64)] for mode in ("recompute", "swap")},
              "output tokens/s")


if __name__ == "__main__":
    main()
