"""Online serving benchmark, like `vllm bench serve` and Figure 12 of the PagedAttention paper.

Requests with ShareGPT-like lengths (random token-id prompts, seeded, drawn anew at each rate so
no rate is served from the prefix cache of the one before) arrive as a Poisson
process (or a burstier gamma process) at each request rate, streaming from /v1/completions of
an OpenAI-compatible server on 127.0.0.1. It reports throughput, TTFT / TPOT / ITL / end-to-end
latency (mean, median, p99) and the paper's normalized latency (mean of latency / output
tokens), writes JSON (--output-json, default benchmarks/results/serving.json under the working
directory), and draws normalized latency against request rate for every server on one PNG
(needs matplotlib: `pip install matplotlib`).

    pagedllm bench serve --quick
    pagedllm bench serve --request-rates 0.25 0.5 1 2 --num-prompts 100
    pagedllm bench serve --vllm-python /path/to/vllm-venv/bin/python   # adds vLLM
    pagedllm bench serve --servers pagedllm:bfloat16 vllm:float32 --vllm-python ...
    pagedllm bench serve --base-url http://127.0.0.1:8000 --label mine  # running server
    pagedllm bench serve --merge a.json b.json --output-json both.json  # earlier runs, together

(or `python -m pagedllm.benchmarks.serving ...`). Servers it launches run one after another on
free 127.0.0.1 ports and are stopped with SIGTERM. The load generator is serving_client.py, the
statistics and the table serving_summary.py.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
from tqdm import tqdm

from pagedllm.benchmarks.cli import run_standalone
from pagedllm.benchmarks.package_path import with_pagedllm_on_path
from pagedllm.benchmarks.serving_client import run_rate
from pagedllm.benchmarks.serving_summary import (
    compare_sustained,
    finite_for_json,
    nan_for_null,
    plot,
    print_sustained,
    print_table,
    summarize,
)
from pagedllm.benchmarks.workloads import BenchRequest, sharegpt_like_workload, with_fresh_prompts

RESULTS = Path("benchmarks", "results")  # under the working directory, not the package
LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1"}
SERVED_NAME = "bench"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def http_get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


class LaunchedServer:
    """A server subprocess on 127.0.0.1 that is ready once /health answers 200."""

    def __init__(self, name: str, cmd: list[str], port: int, log_path: Path,
                 env: dict[str, str] | None = None, startup_timeout_s: float = 900) -> None:
        self.name = name
        self.base_url = f"http://127.0.0.1:{port}"
        self.log_path = log_path
        print(f"--- starting {name}: {' '.join(cmd)} (log: {log_path})", flush=True)
        self._log = open(log_path, "w")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT,
                                     env={**os.environ, **(env or {})})
        start = time.monotonic()
        while True:
            if self.proc.poll() is not None:
                tail = "\n".join(log_path.read_text().splitlines()[-20:])
                raise RuntimeError(f"{name} exited with {self.proc.returncode}:\n{tail}")
            try:
                if http_get(self.base_url + "/health", timeout=2)[0] == 200:
                    break
            except OSError:
                pass
            if time.monotonic() - start > startup_timeout_s:
                self.stop()
                raise TimeoutError(f"{name} not ready after {startup_timeout_s} s")
            time.sleep(0.5)
        self.startup_s = time.monotonic() - start
        print(f"    ready in {self.startup_s:.1f} s", flush=True)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


def launch(name: str, dtype: str, args: argparse.Namespace, log_dir: Path) -> LaunchedServer:
    port = free_port()
    if name == "pagedllm":
        cmd = [sys.executable, "-m", "pagedllm", "serve", args.model, "--host", "127.0.0.1",
               "--port", str(port), "--dtype", dtype, "--served-model-name", SERVED_NAME,
               "--uvicorn-log-level", "warning", *args.pagedllm_args.split()]
        env = with_pagedllm_on_path({"PYTHONPATH": os.environ.get("PYTHONPATH", ""),
                                     "TOKENIZERS_PARALLELISM": "false"})
    elif name == "vllm":
        # Its best setting on a small CPU: both cores compute (none reserved for the frontend);
        # half the host memory for it, since its 0.92 default fails next to other processes.
        cmd = [args.vllm_python, "-m", "vllm.entrypoints.openai.api_server", "--model",
               args.model, "--host", "127.0.0.1", "--port", str(port), "--dtype", dtype,
               "--served-model-name", SERVED_NAME, "--gpu-memory-utilization", "0.5",
               *args.vllm_args.split()]
        env = {"VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1", "TOKENIZERS_PARALLELISM": "false",
               "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}
    else:
        raise ValueError(f"unknown server {name!r}")
    return LaunchedServer(name, cmd, port, log_dir / f"{name}-{dtype}.log", env)


def served_model_name(base_url: str) -> str:
    status, body = http_get(base_url.rstrip("/") + "/v1/models")
    if status != 200:
        raise RuntimeError(f"GET /v1/models answered {status}: pass --model-name")
    return json.loads(body)["data"][0]["id"]


def bench_server(label: str, base_url: str, model: str, args: argparse.Namespace,
                 requests: list[BenchRequest]) -> list[dict]:
    """One server through every rate of --request-rates, after a one-request warm-up."""
    warmup = BenchRequest(requests[0].prompt_token_ids[:8], 4)
    asyncio.run(run_rate(base_url, model, [warmup], math.inf, 1.0, 0, args.ignore_eos))
    rows = []
    for index, rate in enumerate(args.request_rates):
        # New prompt ids (same lengths) at every rate: the same prompts again would be prefill
        # served from the prefix cache of the previous rate. Every server gets the same ones.
        prompts = with_fresh_prompts(requests, args.vocab_size, seed=args.seed + 1 + index)
        if args.disable_tqdm:
            print(f"    {label}: {len(requests)} requests at {rate} req/s ...", flush=True)
        with tqdm(total=len(prompts), unit="req", desc=f"{label} at {rate:g} req/s",
                  disable=args.disable_tqdm) as progress:
            results, duration = asyncio.run(run_rate(base_url, model, prompts, rate,
                                                     args.burstiness, args.seed, args.ignore_eos,
                                                     progress))
        rows.append({"server": label, "request_rate": rate, **summarize(results, duration)})
        if rows[-1]["errors"]:
            tqdm.write(f"    errors: {rows[-1]['errors']}")
    return rows


def check_local(url: str) -> str:
    host = urllib.parse.urlparse(url).hostname
    if host not in LOCAL_HOSTS:
        raise argparse.ArgumentTypeError(f"must be on this machine (127.0.0.1), got {url}")
    return url


def add_cli_args(parser: argparse.ArgumentParser) -> None:
    """The flags of `pagedllm bench serve`."""
    parser.add_argument("--servers", nargs="+", default=["pagedllm"],
                        help="servers to launch, one after another: pagedllm or vllm, optionally "
                             "with a dtype (vllm:float32); --dtype otherwise")
    parser.add_argument("--base-url", type=check_local, default=None,
                        help="benchmark this running server instead of launching any")
    parser.add_argument("--label", default="server", help="name of the --base-url server")
    parser.add_argument("--model-name", default=None,
                        help="model name for --base-url (default: its first /v1/models entry)")
    parser.add_argument("--model", default=None, help="HF directory (default: shipped SmolLM2)")
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    parser.add_argument("--vllm-python", default=None,
                        help="python of a virtualenv with vLLM (CPU) installed; adds vLLM")
    parser.add_argument("--pagedllm-args", default="", help="extra `pagedllm serve` flags")
    parser.add_argument("--vllm-args", default="", help="extra vLLM api_server flags")
    parser.add_argument("--request-rates", type=float, nargs="+", default=[0.25, 0.5, 1.0, 2.0],
                        help="requests per second; inf sends all at once")
    parser.add_argument("--num-prompts", type=int, default=100)
    parser.add_argument("--burstiness", type=float, default=1.0,
                        help="gamma shape of the arrival gaps: 1 is Poisson, < 1 burstier")
    parser.add_argument("--mean-input-len", type=float, default=160)
    parser.add_argument("--mean-output-len", type=float, default=200)
    parser.add_argument("--max-total-len", type=int, default=1024)
    parser.add_argument("--vocab-size", type=int, default=49152,
                        help="random prompt ids are drawn below this")
    parser.add_argument("--no-ignore-eos", dest="ignore_eos", action="store_false",
                        help="let requests stop at EOS (for servers without ignore_eos)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--explode-factor", type=float, default=2.0,
                        help="latency counts as exploded at this multiple of its low-rate value")
    parser.add_argument("--quick", action="store_true",
                        help="a small sweep (short requests, three rates): about 1-2 minutes")
    parser.add_argument("--output-json", "--out", dest="output_json",
                        default=str(RESULTS / "serving.json"),
                        help="where the results go (default: %(default)s)")
    parser.add_argument("--plot", default=None,
                        help="PNG path (default: --output-json with .png)")
    parser.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                        help="benchmark nothing: read the results of earlier runs, then print, "
                             "write and plot them together")
    parser.add_argument("--disable-tqdm", action="store_true", help="no progress bars")


def check_args(args: argparse.Namespace) -> None:
    """ValueError for a bad --servers entry."""
    for spec in args.servers:
        name, _, dtype = spec.partition(":")
        if name not in ("pagedllm", "vllm") or dtype not in ("", "float32", "bfloat16"):
            raise ValueError(f"bad server {spec!r}: pagedllm or vllm[:float32|bfloat16]")


def run(args: argparse.Namespace) -> int:
    """Runs the benchmark of parsed flags (add_cli_args); prints the tables, writes the JSON."""
    if args.merge:
        rows = [nan_for_null(row) for path in args.merge
                for row in json.loads(Path(path).read_text())["results"]]
        report(rows, {"merged": args.merge}, {}, args)
        return 0

    check_args(args)
    if args.quick:
        args.num_prompts, args.request_rates = 12, [0.5, 1.0, 2.0]
        args.mean_input_len, args.mean_output_len, args.max_total_len = 40, 24, 128
    if args.vllm_python and not any(s.startswith("vllm") for s in args.servers):
        args.servers.append("vllm")
    if args.model is None and args.base_url is None:
        from pagedllm.models.default_model import resolve_model_path

        args.model = str(resolve_model_path(None))
    requests = sharegpt_like_workload(args.num_prompts, args.mean_input_len,
                                      args.mean_output_len, args.max_total_len,
                                      args.vocab_size, args.seed)
    print(f"{len(requests)} requests: {np.mean([len(r.prompt_token_ids) for r in requests]):.0f}"
          f" prompt / {np.mean([r.output_len for r in requests]):.0f} output tokens on average")

    rows: list[dict] = []
    startup: dict[str, float] = {}
    log_dir = Path(tempfile.mkdtemp(prefix="pagedllm-bench-"))
    if args.base_url:
        model = args.model_name or served_model_name(args.base_url)
        rows += bench_server(args.label, args.base_url, model, args, requests)
    else:
        for spec in args.servers:
            name, _, dtype = spec.partition(":")
            dtype = dtype or args.dtype
            label = f"{name} ({dtype})"
            try:
                server = launch(name, dtype, args, log_dir)
            except (RuntimeError, TimeoutError) as exc:
                print(f"    {label} failed to start: {exc}", flush=True)
                continue
            try:
                startup[label] = server.startup_s
                rows += bench_server(label, server.base_url, SERVED_NAME, args, requests)
            finally:
                server.stop()
    if not rows:
        print("no server was benchmarked", file=sys.stderr)
        return 1
    report(rows, _config(args), startup, args)
    return 0


def _config(args: argparse.Namespace) -> dict:
    """The benchmark's own settings, for the JSON: not where its outputs go, and none of the
    flags of a command around it (`pagedllm bench serve` parses more than add_cli_args)."""
    own = argparse.ArgumentParser(add_help=False)
    add_cli_args(own)
    names = {action.dest for action in own._actions}
    return {k: v for k, v in vars(args).items()
            if k in names and k not in ("output_json", "plot", "merge", "disable_tqdm")}


def report(rows: list[dict], config: dict, startup: dict[str, float],
           args: argparse.Namespace) -> None:
    """Prints the table and the sustained rates, writes the JSON (--output-json) and the chart."""
    for row in rows:  # read back from JSON, an all-at-once rate is "inf"
        row["request_rate"] = float(row["request_rate"])
    print_table(rows)
    sustained = compare_sustained(rows, args.explode_factor)
    print_sustained(sustained, args.explode_factor)
    out = Path(args.output_json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(finite_for_json({"config": config, "startup_s": startup,
                                               "results": rows, "sustained": sustained}),
                              indent=2))
    print(f"\nwrote {out}")
    plot_path = Path(args.plot) if args.plot else out.with_suffix(".png")
    if plot(rows, plot_path):
        print(f"wrote {plot_path}")


def main(argv: list[str] | None = None) -> int:
    return run_standalone(sys.modules[__name__], argv)


if __name__ == "__main__":
    sys.exit(main())
