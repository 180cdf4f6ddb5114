"""Where tensor parallelism's time goes on this host: the fixed workload once per engine, with
profiling on, and per process its CPU time (user + system, from /proc) next to the wall
time, plus every rank's profile sections per step (the native stack's parts included, its
all-reduce apart). CPU time, not wall time, is what a shared machine cannot distort much:
a rank's CPU seconds per step are its work (and its spinning) whatever else runs.

    python -m pagedllm.benchmarks.tp_profile --model /tmp/smollm2-shape-8h \
        --engines tp1 tp2 tp2,PAGEDLLM_CPU_THREADS_BIND=nobind [--requests 64] \
        [--output-len 128] [--rounds 2]

Prints one table per engine and writes benchmarks/results/tp_profile.json.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil

from pagedllm.benchmarks.workloads import fixed_workload


def rank_profile(worker) -> dict:
    """On a rank: its profile's seconds and counts, its steps, its pid."""
    p = worker.profiler
    return {"seconds": dict(p.seconds), "counts": dict(p.counts), "steps": p.num_steps,
            "pid": os.getpid()}


def reset_profile(worker) -> None:
    """Clears the profile; from then on the garbage collector's pauses are timed into it too
    ("gc"): a pause in one rank stalls every rank at the next all-reduce."""
    p = worker.profiler
    p.seconds.clear()
    p.counts.clear()
    p.num_steps = 0
    gc.callbacks[:] = [cb for cb in gc.callbacks if not getattr(cb, "times_gc", False)]
    started = []

    def time_gc(phase: str, info: dict) -> None:
        if phase == "start":
            started.append(time.perf_counter())
        elif started:
            p.record(f"gc gen{info['generation']}", time.perf_counter() - started.pop())

    time_gc.times_gc = True
    gc.callbacks.append(time_gc)


def cpu_seconds(pids: list[int], kind: str = "both") -> dict[int, float]:
    """Each process's CPU seconds so far: user + system, or one of them."""
    out = {}
    for pid in pids:
        t = psutil.Process(pid).cpu_times()
        out[pid] = {"both": t.user + t.system, "user": t.user, "system": t.system}[kind]
    return out


IDLE_ENGINE = """
import sys
from pagedllm import LLM, SamplingParams
llm = LLM(sys.argv[1], dtype=sys.argv[2])
llm.generate([{"prompt_token_ids": list(range(1000, 1016))}],
             SamplingParams(temperature=0, max_tokens=1, ignore_eos=True), use_tqdm=False)
print("ready", flush=True)
sys.stdin.read()
"""


def start_idle_engine(args: argparse.Namespace) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", IDLE_ENGINE, args.model, args.dtype],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    if proc.stdout.readline().strip() != "ready":
        raise RuntimeError(f"the idle engine did not start (exit {proc.wait()})")
    return proc


def run_engine(name: str, args: argparse.Namespace) -> dict:
    from pagedllm import LLM, SamplingParams

    # "tp2" or "tp2,NAME=VALUE,...": environment settings for this engine's start (the
    # ranks read theirs at start, e.g. PAGEDLLM_CPU_THREADS_BIND, PAGEDLLM_TP_COMM).
    spec, *settings = name.split(",")
    # "+idle": a TP=1 engine of the same model loaded and idle in another process meanwhile,
    # as `bench throughput` keeps every engine it compares.
    idle = None
    if "+idle" in settings:
        settings.remove("+idle")
        idle = start_idle_engine(args)
    # "+noprofile": as `bench throughput` starts it (profiling off: wall and CPU time only).
    profile = "+noprofile" not in settings
    settings = [setting for setting in settings if setting != "+noprofile"]
    tp = int(spec.removeprefix("tp"))
    kwargs = {"tensor_parallel_size": tp} if tp > 1 else {}
    saved = dict(os.environ)
    os.environ.update(setting.split("=", 1) for setting in settings)
    try:
        llm = LLM(args.model, dtype=args.dtype, profile=profile, **kwargs)
    finally:
        os.environ.clear()
        os.environ.update(saved)
    engine = llm.llm_engine
    executor = engine.model_executor
    pids = [os.getpid(), *(getattr(executor, "worker_pids", []) if tp > 1 else [])]
    names = {pid: "driver" if i == 0 else f"rank{i - 1}" for i, pid in enumerate(pids)}

    def measure(seed: int, output_len: int) -> dict:
        requests = fixed_workload(num_requests=args.requests, output_len=output_len,
                                  seed=seed)
        prompts = [{"prompt_token_ids": r.prompt_token_ids} for r in requests]
        params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
        reset_profile(engine)  # the driver's profile (at tp1, also the worker's)
        if tp > 1:
            executor.collective_rpc(reset_profile)
        before, system_before = cpu_seconds(pids), cpu_seconds(pids, "system")
        start = time.perf_counter()
        outputs = llm.generate(prompts, params, use_tqdm=False)
        wall = time.perf_counter() - start
        after, system_after = cpu_seconds(pids), cpu_seconds(pids, "system")
        profiles = {"driver": rank_profile(engine)}
        if tp > 1:
            for rank, prof in enumerate(executor.collective_rpc(rank_profile)):
                profiles[f"rank{rank}"] = prof
        tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
        return {"wall_s": wall, "out_tok_s": tokens / wall, "tokens": tokens,
                "cpu_s": {names[pid]: after[pid] - before[pid] for pid in pids},
                "system_cpu_s": {names[pid]: system_after[pid] - system_before[pid]
                                 for pid in pids},
                "profiles": profiles}

    measure(seed=2, output_len=2)  # warm-up: the steps' buffers at their full sizes
    # The prefill alone first (other prompts: no prefix-cache hit in the whole run after).
    prefill = measure(seed=1, output_len=1)
    result = measure(seed=0, output_len=args.output_len)
    llm.shutdown()
    if idle is not None:
        idle.stdin.close()
        idle.wait()
    return {"engine": name, **result, "prefill": prefill}


def print_result(r: dict) -> None:
    steps = max(r["profiles"]["driver"]["steps"], 1)
    pre = r["prefill"]
    pre_steps = pre["profiles"]["driver"]["steps"]
    print(f"\n== {r['engine']} (round {r['round']}): {r['out_tok_s']:.0f} out tok/s, wall "
          f"{r['wall_s']:.2f} s, {steps} steps; the prefill alone {pre['wall_s']:.2f} s in "
          f"{pre_steps} steps")
    print("CPU s per process (whole run; prefill alone), of which system: " + ", ".join(
        f"{k} {v:.2f} ({r['system_cpu_s'][k]:.2f}); {pre['cpu_s'][k]:.2f} "
        f"({pre['system_cpu_s'][k]:.2f})" for k, v in r["cpu_s"].items()))
    for who, prof in r["profiles"].items():
        n = max(prof["steps"], 1)
        pre_prof = pre["profiles"][who]
        # Decode steps: the whole run's profile less the prefill's (same prompt lengths).
        decode_steps = max(n - pre_prof["steps"], 1)
        print(f"  {who}: ms per step, whole run ({n} steps) | prefill ({pre_prof['steps']}) | "
              f"decode ({decode_steps}, by difference)")
        for name, sec in sorted(prof["seconds"].items(), key=lambda kv: -kv[1]):
            p_sec = pre_prof["seconds"].get(name, 0.0)
            print(f"    {name:<24} {1000 * sec / n:9.2f} | "
                  f"{1000 * p_sec / max(pre_prof['steps'], 1):9.2f} | "
                  f"{1000 * (sec - p_sec) / decode_steps:9.2f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--engines", nargs="+", default=["tp1", "tp2"])
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=1,
                        help="each engine starts once per round; engines take turns, in "
                             "reverse order every other round")
    parser.add_argument("--output", default="benchmarks/results/tp_profile.json")
    args = parser.parse_args(argv)
    results = []
    for round_index in range(args.rounds):
        # Engines take turns, in reverse order every other round (the engine that follows
        # another's shutdown starts on a host still settling its memory).
        order = args.engines if round_index % 2 == 0 else args.engines[::-1]
        for name in order:
            results.append(run_engine(name, args) | {"round": round_index})
            print_result(results[-1])
    print("\nout tok/s per round: " + "; ".join(
        f"{name}: " + ", ".join(f"{r['out_tok_s']:.0f}" for r in results if r["engine"] == name)
        for name in args.engines))
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
