"""A fresh process's first burst against the KV pool's commit modes (issue 30: "no throughput
loss" with the pool committed as it is used).

Each run is a fresh Python process: it imports pagedllm, builds `LLM()` (the shipped model,
default settings), generates one token, runs the workload (burst 1), stays idle `--gap` seconds
(the `ahead` committer commits further and collapses into huge pages) and runs it again (burst
2). Arms, one process each, taking turns within every round:

- `ahead`: the default (`PAGEDLLM_KV_POOL_COMMIT=ahead`: the committer, 4 KiB pages while
  busy, huge pages at idle);
- `start`: the whole pool written at start, in huge pages (`PAGEDLLM_KV_POOL_COMMIT=start`);
- `ahead-prefaultN`: `ahead` with the pool's first N MiB committed in huge pages while the engine
  starts (PAGEDLLM_KV_PREFAULT_BYTES: cache_engine.start_kv_prefault).

Printed per run: out tok/s of each burst and its ratio to `start` in the same round, `LLM()`'s
seconds, RSS when ready and at the end, the process's CPU seconds per burst (user + system: on a
loaded machine they move far less than wall time; with --threads 1 no OpenMP team spins), the
committer's share of them, and the MiB of anonymous memory in huge pages after burst 1.

    python -m pagedllm.benchmarks.kv_first_burst --rounds 2 --gap 6
    python -m pagedllm.benchmarks.kv_first_burst --threads 1 --arms ahead,ahead-prefault384,start
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ARMS = {
    "ahead": {"PAGEDLLM_KV_POOL_COMMIT": "ahead", "PAGEDLLM_KV_PREFAULT_BYTES": "0"},
    "start": {"PAGEDLLM_KV_POOL_COMMIT": "start"},
}
_CLOCK_START = time.perf_counter()


def _status_mib(field: str) -> int | None:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) >> 10
    return None


def _anon_huge_mib() -> int | None:
    try:
        with open("/proc/self/smaps_rollup") as f:
            for line in f:
                if line.startswith("AnonHugePages:"):
                    return int(line.split()[1]) >> 10
    except OSError:
        pass
    return None


def _thread_cpu(native_id: int | None) -> float | None:
    if native_id is None:
        return None
    try:
        with open(f"/proc/self/task/{native_id}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:  # the thread ended
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _process_cpu() -> float:
    times = os.times()
    return times.user + times.system


def child(arm: str, round_index: int, workload: str, gap: float) -> dict:
    """One run (in the fresh process this is)."""
    from pagedllm import LLM, SamplingParams
    from pagedllm.benchmarks.workloads import round_requests

    imported = time.perf_counter()
    llm = LLM(seed=0)
    ready = time.perf_counter() - imported
    out = {"arm": arm, "round": round_index, "imports_s": round(imported - _CLOCK_START, 2),
           "ready_s": round(ready, 2), "rss_ready_mib": _status_mib("VmRSS")}
    llm.generate([{"prompt_token_ids": list(range(1000, 1016))}],
                 SamplingParams(temperature=0, max_tokens=1), use_tqdm=False)
    worker = getattr(llm.llm_engine.model_executor, "driver_worker", None)
    cache_engine = getattr(worker, "cache_engine", None)
    committer = getattr(cache_engine, "committer", None)
    committer_id = committer._thread.native_id if committer is not None else None
    out["prefaulted_pages"] = getattr(cache_engine, "prefaulted_pages", None)
    for burst in (1, 2):
        if burst == 2:
            time.sleep(gap)
        requests = round_requests(workload, None, 100 + round_index + 10 * burst)
        prompts = [{"prompt_token_ids": r.prompt_token_ids} for r in requests]
        params = [SamplingParams(temperature=0, max_tokens=r.output_len, ignore_eos=True)
                  for r in requests]
        cpu, committer_cpu = _process_cpu(), _thread_cpu(committer_id)
        start = time.perf_counter()
        outputs = llm.generate(prompts, params, use_tqdm=False)
        seconds = time.perf_counter() - start
        cpu, committer_end = _process_cpu() - cpu, _thread_cpu(committer_id)
        tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
        out[f"burst{burst}_tok_s"] = round(tokens / seconds, 1)
        out[f"burst{burst}_cpu_s"] = round(cpu, 2)
        out[f"burst{burst}_committer_cpu_s"] = (
            None if committer_cpu is None or committer_end is None
            else round(committer_end - committer_cpu, 2))
        out[f"burst{burst}_huge_mib"] = _anon_huge_mib()
    out["rss_end_mib"] = _status_mib("VmRSS")
    out["peak_rss_mib"] = _status_mib("VmHWM")
    out["blocks_touched"] = llm.llm_engine.block_manager.pool.num_touched_blocks
    return out


def arm_env(arm: str) -> dict[str, str]:
    """The environment an arm sets; KeyError for an unknown arm."""
    if arm.startswith("ahead-prefault") and arm[len("ahead-prefault"):].isdigit():
        return {"PAGEDLLM_KV_POOL_COMMIT": "ahead",
                "PAGEDLLM_KV_PREFAULT_BYTES": str(int(arm[len("ahead-prefault"):]) << 20)}
    return ARMS[arm]


def run_arm(arm: str, round_index: int, args) -> dict:
    env = {**os.environ, **arm_env(arm)}
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    command = [sys.executable, "-m", "pagedllm.benchmarks.kv_first_burst", "--child", arm,
               "--round-index", str(round_index), "--workload", args.workload,
               "--gap", str(args.gap)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    for line in done.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise RuntimeError(f"{arm} run failed (exit {done.returncode}): {done.stderr[-2000:]}")


def table(results: list[dict]) -> str:
    starts = {(r["round"], b): r[f"burst{b}_tok_s"] for r in results if r["arm"] == "start"
              for b in (1, 2)}
    lines = [("| round | arm | burst 1 tok/s | burst 2 tok/s | burst 1 / 2 CPU s (committer) "
              "| `LLM()` s | RSS ready / end MiB | huge MiB after burst 1 | prefaulted |"),
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        cells = []
        for b in (1, 2):
            value, base = r[f"burst{b}_tok_s"], starts.get((r["round"], b))
            ratio = f" ({value / base:.2f}x)" if base and r["arm"] != "start" else ""
            cells.append(f"{value}{ratio}")
        cpu = " / ".join(f"{r[f'burst{b}_cpu_s']} ({r[f'burst{b}_committer_cpu_s']})"
                         for b in (1, 2))
        lines.append(f"| {r['round']} | {r['arm']} | {cells[0]} | {cells[1]} | {cpu} | "
                     f"{r['ready_s']} | {r['rss_ready_mib']} / {r['rss_end_mib']} | "
                     f"{r['burst1_huge_mib']} | {r['prefaulted_pages']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arms", default="ahead,ahead-prefault256,start",
                        help=f"comma-separated, of {', '.join(ARMS)}")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--gap", type=float, default=6.0, help="idle seconds between bursts")
    parser.add_argument("--workload", default="fixed")
    parser.add_argument("--threads", type=int, default=0,
                        help="OMP_NUM_THREADS of the runs (0: the engine's default)")
    parser.add_argument("--output-json", default=None)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--round-index", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        result = child(args.child, args.round_index, args.workload, args.gap)
        print("RESULT " + json.dumps(result), flush=True)
        return
    arms = args.arms.split(",")
    unknown = [a for a in arms if a not in ARMS and not a.startswith("ahead-prefault")]
    if unknown:
        parser.error(f"unknown arms {unknown}: choose from {', '.join(ARMS)}, "
                     "ahead-prefaultN (MiB)")
    results = []
    for round_index in range(1, args.rounds + 1):
        # Turns alternate: each round runs the arms in the other order.
        for arm in (arms if round_index % 2 else arms[::-1]):
            result = run_arm(arm, round_index, args)
            print(json.dumps(result), flush=True)
            results.append(result)
    print(table(results))
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
