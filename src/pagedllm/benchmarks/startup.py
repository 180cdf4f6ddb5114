"""Start-up time: where the time goes from process start to ready, for `LLM()` and for
`pagedllm serve` (issue 30).

Each start runs in a fresh Python process. `llm`: the process imports pagedllm, builds
`LLM(...)` and generates one token from a 4-token prompt; the engine marks its phases (pagedllm.startup_profile:
imports, config, tokenizer, weights read, weights packed (or read from the packed-weight
cache), KV pool, the rest) and the
table shows each phase's mean seconds, the ready time (process start to `LLM()` returned), the
first forward, and the peak and idle RSS. `serve`: the time from process start to the first
`/health` 200, and the server's peak and idle RSS then. Both also give the CPU seconds (user +
system) the process had used when ready: on a shared machine they move far less with the
load than the wall-clock times do. The first start (cold: conversion,
packing, native build, the page cache) is reported apart from the --num-starts warm ones.
Results go as JSON to --output-json (default benchmarks/results/startup.json).

    pagedllm bench startup                           # the shipped model, llm and serve, 3 starts
    pagedllm bench startup --mode llm --num-starts 5 --num-kv-blocks 64

(or `python -m pagedllm.benchmarks.startup ...`).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import fields
from pathlib import Path

from pagedllm.benchmarks.cli import run_standalone
from pagedllm.config import EngineConfig
from pagedllm.startup_profile import START_ENV

RESULTS = Path("benchmarks", "results")
MODES = ("llm", "serve", "both")
HEALTH_TIMEOUT_S = 300.0

# The child of an `llm` start: builds LLM(**kwargs) (kwargs as JSON in argv[1]), generates one
# token, prints its phases and memory as one JSON line.
_LLM_CHILD = r"""
import json, os, sys, time
from pagedllm import startup_profile as sp
from pagedllm import LLM, SamplingParams
llm = LLM(**json.loads(sys.argv[1]))
ready = time.time()
cpu = sum(os.times()[:2])
llm.generate({"prompt_token_ids": [1, 2, 3, 4]}, SamplingParams(max_tokens=1, temperature=0.0), use_tqdm=False)
first = time.time()
def rss_kib(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1])
print("STARTUP " + json.dumps({
    "phases": sp.phases(), "ready_s": ready - sp.process_start(), "first_forward_s": first - ready,
    "ready_cpu_s": cpu,
    "peak_rss_mib": rss_kib("VmHWM:") / 1024,
    "idle_rss_mib": rss_kib("VmRSS:") / 1024}))
"""


def add_cli_args(parser: argparse.ArgumentParser) -> None:
    """The flags of `pagedllm bench startup`: the mode and starts, then every engine setting."""
    parser.add_argument("--mode", choices=MODES, default="both",
                        help="time LLM(), `pagedllm serve`, or both (default: %(default)s)")
    parser.add_argument("--num-starts", type=int, default=3,
                        help="warm starts timed after the first (cold) one")
    parser.add_argument("--output-json", default=str(RESULTS / "startup.json"),
                        help="where the results go (default: %(default)s)")
    EngineConfig.add_cli_args(parser)


def check_args(args: argparse.Namespace) -> None:
    """ValueError naming a flag out of range."""
    if args.num_starts < 1:
        raise ValueError("--num-starts must be at least 1")


def engine_kwargs(args: argparse.Namespace) -> dict:
    """The settings that differ from EngineConfig's defaults, as `LLM` keyword arguments."""
    defaults = {f.name: f.default for f in fields(EngineConfig)}
    return {k: v for k, v in EngineConfig.kwargs_from_cli_args(args).items()
            if k in defaults and v != defaults[k]}


def serve_flags(kwargs: dict) -> list[str]:
    """`pagedllm serve` flags of LLM keyword arguments."""
    flags = []
    for name, value in kwargs.items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            flags.append(flag if value else "--no-" + name.replace("_", "-"))
        elif isinstance(value, dict):
            flags += [flag, json.dumps(value)]
        else:
            flags += [flag, str(value)]
    return flags


def _env(start: float) -> dict:
    return {**os.environ, START_ENV: repr(start)}


def start_llm(kwargs: dict) -> dict:
    """One `LLM()` start in a fresh process: its phases, ready time and memory."""
    start = time.time()
    proc = subprocess.run([sys.executable, "-c", _LLM_CHILD, json.dumps(kwargs)],
                          env=_env(start), capture_output=True, text=True, check=False)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("STARTUP ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"LLM() start failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    result = json.loads(lines[-1][len("STARTUP "):])
    result["phases"] = dict(result["phases"])
    return result


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _status_mib(pid: int, key: str) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) / 1024
    return float("nan")


def start_server(kwargs: dict) -> dict:
    """One `pagedllm serve` start in a fresh process: seconds to the first /health 200, and
    the server's peak and idle RSS then."""
    port = _free_port()
    start = time.time()
    proc = subprocess.Popen(
        [sys.executable, "-m", "pagedllm.entrypoints.cli", "serve", "--port", str(port),
         "--uvicorn-log-level", "warning", *serve_flags(kwargs)],
        env=_env(start), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"pagedllm serve exited {proc.returncode}:\n"
                                   f"{proc.stderr.read()[-4000:]}")
            if time.time() - start > HEALTH_TIMEOUT_S:
                raise RuntimeError(f"no /health 200 within {HEALTH_TIMEOUT_S:.0f} s")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.02)
        health = time.time() - start
        cpu = _cpu_seconds(proc.pid)
        time.sleep(0.5)  # idle
        return {"health_s": health, "health_cpu_s": cpu,
                "peak_rss_mib": _status_mib(proc.pid, "VmHWM:"),
                "idle_rss_mib": _status_mib(proc.pid, "VmRSS:")}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far (/proc/PID/stat)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _mean(rows: list[dict], key: str) -> float:
    return sum(r[key] for r in rows) / len(rows)


def summarize_llm(starts: list[dict]) -> dict:
    """Mean seconds per phase and of the totals over the starts."""
    phases = {}
    for name in starts[0]["phases"]:
        phases[name] = sum(s["phases"].get(name, 0.0) for s in starts) / len(starts)
    return {"phases": phases, **{k: _mean(starts, k) for k in
                                 ("ready_s", "ready_cpu_s", "first_forward_s", "peak_rss_mib",
                                  "idle_rss_mib")}}


def print_table(result: dict) -> None:
    if "llm" in result:
        cold, warm = result["llm"]["cold"], result["llm"]["warm"]
        print(f"{'LLM() phase':34s} {'first (s)':>10s} {'warm (s)':>10s}")
        for name, seconds in warm["phases"].items():
            print(f"{name:34s} {cold['phases'].get(name, 0.0):10.3f} {seconds:10.3f}")
        for key, label in (("ready_s", "LLM() ready"), ("ready_cpu_s", "LLM() ready, CPU s"),
                           ("first_forward_s", "first forward")):
            print(f"{label:34s} {cold[key]:10.3f} {warm[key]:10.3f}")
        for key, label in (("peak_rss_mib", "peak RSS (MiB)"), ("idle_rss_mib", "idle RSS (MiB)")):
            print(f"{label:34s} {cold[key]:10.0f} {warm[key]:10.0f}")
    if "serve" in result:
        cold, warm = result["serve"]["cold"], result["serve"]["warm"]
        print(f"{'pagedllm serve':34s} {'first':>10s} {'warm':>10s}")
        print(f"{'/health 200 (s)':34s} {cold['health_s']:10.3f} {warm['health_s']:10.3f}")
        print(f"{'/health 200, CPU s':34s} {cold['health_cpu_s']:10.3f} "
              f"{warm['health_cpu_s']:10.3f}")
        for key, label in (("peak_rss_mib", "peak RSS (MiB)"), ("idle_rss_mib", "idle RSS (MiB)")):
            print(f"{label:34s} {cold[key]:10.0f} {warm[key]:10.0f}")


def run(args: argparse.Namespace) -> int:
    kwargs = engine_kwargs(args)
    result: dict = {"engine_kwargs": kwargs, "num_starts": args.num_starts}
    if args.mode in ("llm", "both"):
        cold = start_llm(kwargs)
        warm = [start_llm(kwargs) for _ in range(args.num_starts)]
        result["llm"] = {"cold": summarize_llm([cold]), "warm": summarize_llm(warm),
                         "starts": warm}
    if args.mode in ("serve", "both"):
        cold = start_server(kwargs)
        warm = [start_server(kwargs) for _ in range(args.num_starts)]
        result["serve"] = {"cold": cold, "starts": warm, "warm": {
            k: _mean(warm, k) for k in ("health_s", "health_cpu_s", "peak_rss_mib",
                                        "idle_rss_mib")}}
    print_table(result)
    out = Path(args.output_json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"results written to {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_standalone(sys.modules[__name__], argv)


if __name__ == "__main__":
    sys.exit(main())
