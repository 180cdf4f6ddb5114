"""Start-up time: where the time goes from process start to ready, for `LLM()` and for
`pagedllm serve` (issue 30).

Each start runs in a fresh Python process. `llm`: the process imports pagedllm, builds
`LLM(...)` and generates one token from a 4-token prompt; the engine marks its phases (pagedllm.startup_profile:
imports, config, tokenizer, weights read, weights packed (or read from the packed-weight
cache), KV pool, the rest) and the
table shows each phase's mean seconds, the ready time (process start to `LLM()` returned), the
first forward, and the peak and idle RSS. `serve`: the time from process start to the first
`/health` 200, its phases (the server's modules, the engine's phases, the server's app, the
collection at ready, the server started; the rest is uvicorn listening and the first answer),
and the server's peak and idle RSS then. Both also give the CPU seconds (user +
system) the process had used when ready: on a shared machine they move far less with the
load than the wall-clock times do. The first start is reported apart from the --num-starts
warm ones; it finds what earlier runs left in pagedllm's cache folder (the converted model, the
native ops, the packed weights, the config records), so it is "cold" only for the page cache.
--cold makes it the first start after install: each mode's starts get a fresh, empty cache
folder (PAGEDLLM_CACHE_DIR and the packed-weight and record folders pointed into it), so its
first start converts the shipped GGUF, builds the native CPU ops (minutes on a loaded
machine), packs the weights and writes them and the records, and the warm starts after it read
that folder. The table then also shows how long the conversion and the native build took
within the first start (from the fresh folder's lock and result files). Results go as JSON to
--output-json (default benchmarks/results/startup.json).

    pagedllm bench startup                           # the shipped model, llm and serve, 3 starts
    pagedllm bench startup --mode llm --num-starts 5 --num-kv-blocks 64
    pagedllm bench startup --mode llm --cold         # the first start after install

(or `python -m pagedllm.benchmarks.startup ...`).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import fields
from pathlib import Path

from pagedllm.benchmarks.cli import run_standalone
from pagedllm.config import EngineConfig
from pagedllm.startup_profile import REPORT_PREFIX, START_ENV

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
print(sp.REPORT_PREFIX + json.dumps({
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
    parser.add_argument("--cold", action="store_true",
                        help="make the first start of each mode the first after install: a "
                             "fresh cache folder (conversion, native build, packing; minutes)")
    parser.add_argument("--cold-cache-dir", default=None,
                        help="with --cold, make the fresh cache folders under this folder "
                             "(default: the system's temporary folder); removed afterwards")
    EngineConfig.add_cli_args(parser)


def check_args(args: argparse.Namespace) -> None:
    """ValueError naming a flag out of range."""
    if args.num_starts < 1:
        raise ValueError("--num-starts must be at least 1")
    if args.cold_cache_dir is not None and not args.cold:
        raise ValueError("--cold-cache-dir needs --cold")


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


def cold_env(root: Path) -> dict[str, str]:
    """The environment variables that point every cache pagedllm keeps between starts into
    `root`: the cache folder (converted models, native ops build) and the folders the packed
    weights and the config/tokenizer records may be moved out of it to."""
    from pagedllm.models.hf_fast import RECORD_DIR_ENV
    from pagedllm.models.packed_cache import CACHE_DIR_ENV

    return {"PAGEDLLM_CACHE_DIR": str(root), CACHE_DIR_ENV: str(root / "packed_weights"),
            RECORD_DIR_ENV: str(root / "hf_records")}


def cold_work_seconds(root: Path) -> dict[str, float | None]:
    """How long the one-off work of a start in the fresh cache folder `root` took, from its
    files: the native build from its lock taken (`torch_extensions/<build>.lock`) to its BUILT
    stamp, the model's conversion from its lock (`models/<key>.lock`) to the last file of the
    converted directory. None where that work did not happen (e.g. a model given as a
    directory is not converted)."""
    def span(lock: Path, end: float | None) -> float | None:
        return None if end is None else end - lock.stat().st_mtime

    out: dict[str, float | None] = {"native build": None, "conversion": None}
    for lock in sorted(root.glob("torch_extensions/*.lock")):
        built = lock.with_suffix("") / "BUILT"
        out["native build"] = span(lock, built.stat().st_mtime if built.is_file() else None)
    for lock in sorted(root.glob("models/*.lock")):
        files = [f.stat().st_mtime for f in lock.with_suffix("").rglob("*") if f.is_file()]
        out["conversion"] = span(lock, max(files) if files else None)
    return out


def _env(start: float, extra: dict[str, str] | None = None) -> dict:
    """This environment for a start, without PYTHONDONTWRITEBYTECODE: a warm start is one with
    its caches written, Python's bytecode of pagedllm's modules among them (an install has it;
    without it ~120 modules are compiled again at every start)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    return {**env, **(extra or {}), START_ENV: repr(start)}


def start_llm(kwargs: dict, extra_env: dict[str, str] | None = None) -> dict:
    """One `LLM()` start in a fresh process: its phases, ready time and memory."""
    start = time.time()
    proc = subprocess.run([sys.executable, "-c", _LLM_CHILD, json.dumps(kwargs)],
                          env=_env(start, extra_env), capture_output=True, text=True,
                          check=False)
    result = _reported(proc.stdout)
    if proc.returncode != 0 or result is None:
        raise RuntimeError(f"LLM() start failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    result["phases"] = dict(result["phases"])
    return result


def _reported(output: str) -> dict | None:
    """What a start printed last as a `STARTUP {json}` line (startup_profile.REPORT_PREFIX: the
    LLM child's on stdout, a server's report on stderr), or None."""
    lines = [ln for ln in output.splitlines() if ln.startswith(REPORT_PREFIX)]
    return json.loads(lines[-1][len(REPORT_PREFIX):]) if lines else None


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


def time_server_start(proc: subprocess.Popen, port: int, start: float, name: str
                      ) -> tuple[dict, str]:
    """For a server `proc` started at `start` (time.time()) on `port`, its stderr piped: the
    seconds to its first /health 200 (polled every 5 ms: a poll's wait adds to what is
    measured), its CPU seconds then, and its peak and idle RSS 0.5 s later; then it is stopped
    and its stderr returned. RuntimeError where it exits first or takes HEALTH_TIMEOUT_S."""
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited {proc.returncode}:\n"
                                   f"{proc.stderr.read()[-4000:]}")
            if time.time() - start > HEALTH_TIMEOUT_S:
                raise RuntimeError(f"no /health 200 within {HEALTH_TIMEOUT_S:.0f} s")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.005)
        ready = time.time() - start
        cpu = _cpu_seconds(proc.pid)
        time.sleep(0.5)  # idle
        measured = {"ready_s": ready, "ready_cpu_s": cpu,
                    "peak_rss_mib": _status_mib(proc.pid, "VmHWM:"),
                    "idle_rss_mib": _status_mib(proc.pid, "VmRSS:")}
    finally:
        proc.terminate()
        try:
            _, stderr = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, stderr = proc.communicate()
    return measured, stderr


def start_server(kwargs: dict, extra_env: dict[str, str] | None = None) -> dict:
    """One `pagedllm serve` start in a fresh process: seconds to the first /health 200, and
    the server's peak and idle RSS then."""
    port = _free_port()
    start = time.time()
    proc = subprocess.Popen(
        [sys.executable, "-m", "pagedllm.entrypoints.cli", "serve", "--port", str(port),
         "--uvicorn-log-level", "warning", *serve_flags(kwargs)],
        env=_env(start, extra_env), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        text=True)
    measured, stderr = time_server_start(proc, port, start, "pagedllm serve")
    health = measured["ready_s"]
    # The server's phases up to listening (startup_profile.report); the rest of health_s is
    # uvicorn binding and the first answer.
    reported = _reported(stderr)
    phases = dict(reported["phases"]) if reported else {}
    if phases:
        phases["listening, first /health"] = health - sum(phases.values())
    return {"health_s": health, "health_cpu_s": measured["ready_cpu_s"],
            "peak_rss_mib": measured["peak_rss_mib"], "idle_rss_mib": measured["idle_rss_mib"],
            "phases": phases}


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
    first = "install (s)" if result.get("cold") else "first (s)"
    if "llm" in result:
        cold, warm = result["llm"]["cold"], result["llm"]["warm"]
        print(f"{'LLM() phase':34s} {first:>11s} {'warm (s)':>10s}")
        for name, seconds in warm["phases"].items():
            print(f"{name:34s} {cold['phases'].get(name, 0.0):11.3f} {seconds:10.3f}")
        for key, label in (("ready_s", "LLM() ready"), ("ready_cpu_s", "LLM() ready, CPU s"),
                           ("first_forward_s", "first forward")):
            print(f"{label:34s} {cold[key]:11.3f} {warm[key]:10.3f}")
        _print_cold_work(result["llm"].get("cold_work"))
        for key, label in (("peak_rss_mib", "peak RSS (MiB)"), ("idle_rss_mib", "idle RSS (MiB)")):
            print(f"{label:34s} {cold[key]:11.0f} {warm[key]:10.0f}")
    if "serve" in result:
        cold, warm = result["serve"]["cold"], result["serve"]["warm"]
        print(f"{'pagedllm serve':34s} {first[:-4]:>11s} {'warm':>10s}")
        for name, seconds in warm.get("phases", {}).items():
            print(f"{'  ' + name:34s} {cold['phases'].get(name, 0.0):11.3f} {seconds:10.3f}")
        print(f"{'/health 200 (s)':34s} {cold['health_s']:11.3f} {warm['health_s']:10.3f}")
        print(f"{'/health 200, CPU s':34s} {cold['health_cpu_s']:11.3f} "
              f"{warm['health_cpu_s']:10.3f}")
        _print_cold_work(result["serve"].get("cold_work"))
        for key, label in (("peak_rss_mib", "peak RSS (MiB)"), ("idle_rss_mib", "idle RSS (MiB)")):
            print(f"{label:34s} {cold[key]:11.0f} {warm[key]:10.0f}")


def _print_cold_work(work: dict | None) -> None:
    for name, seconds in (work or {}).items():
        shown = "-" if seconds is None else f"{seconds:.3f}"
        print(f"{'  of which ' + name:34s} {shown:>11s} {'-':>10s}")


def _starts(start, kwargs: dict, num_starts: int, cold: bool,
            cold_parent: str | None) -> tuple[dict, list[dict], dict | None]:
    """The first start and `num_starts` warm ones; with `cold`, all in a fresh cache folder
    (removed afterwards), and what the first start's one-off work took."""
    if not cold:
        return start(kwargs), [start(kwargs) for _ in range(num_starts)], None
    root = Path(tempfile.mkdtemp(prefix="pagedllm-cold-", dir=cold_parent))
    try:
        env = cold_env(root)
        first = start(kwargs, env)
        work = cold_work_seconds(root)
        return first, [start(kwargs, env) for _ in range(num_starts)], work
    finally:
        shutil.rmtree(root, ignore_errors=True)


def run(args: argparse.Namespace) -> int:
    kwargs = engine_kwargs(args)
    result: dict = {"engine_kwargs": kwargs, "num_starts": args.num_starts, "cold": args.cold}
    if args.mode in ("llm", "both"):
        cold, warm, work = _starts(start_llm, kwargs, args.num_starts, args.cold,
                                   args.cold_cache_dir)
        result["llm"] = {"cold": summarize_llm([cold]), "warm": summarize_llm(warm),
                         "starts": warm, "cold_work": work}
    if args.mode in ("serve", "both"):
        cold, warm, work = _starts(start_server, kwargs, args.num_starts, args.cold,
                                   args.cold_cache_dir)
        result["serve"] = {"cold": cold, "starts": warm, "cold_work": work, "warm": {
            **{k: _mean(warm, k) for k in ("health_s", "health_cpu_s", "peak_rss_mib",
                                           "idle_rss_mib")},
            "phases": {name: sum(s["phases"].get(name, 0.0) for s in warm) / len(warm)
                       for name in warm[0]["phases"]}}}
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
