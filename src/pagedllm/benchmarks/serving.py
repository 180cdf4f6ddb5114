"""Online serving benchmark, like `vllm bench serve` and Figure 12 of the PagedAttention paper.

Requests with ShareGPT-like lengths (random token-id prompts, seeded, drawn anew at each rate so
no rate is served from the prefix cache of the one before) arrive as a Poisson
process (or a burstier gamma process) at each request rate, streaming from /v1/completions of
an OpenAI-compatible server on 127.0.0.1. It reports throughput, TTFT / TPOT / ITL / end-to-end
latency (mean, median, p99) and the paper's normalized latency (mean of latency / output
tokens), writes JSON, and draws normalized latency against request rate for every server on one
PNG (needs matplotlib: `pip install matplotlib`).

    python benchmarks/serving.py --quick
    python benchmarks/serving.py --request-rates 0.25 0.5 1 2 --num-prompts 100
    python benchmarks/serving.py --vllm-python /path/to/vllm-venv/bin/python   # adds vLLM
    python benchmarks/serving.py --servers pagedllm:bfloat16 vllm:float32 --vllm-python ...
    python benchmarks/serving.py --base-url http://127.0.0.1:8000 --label mine  # running server
    python benchmarks/serving.py --merge a.json b.json --out both.json  # earlier runs, together

Servers it launches run one after another on free 127.0.0.1 ports and are stopped with SIGTERM.
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
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from workloads import BenchRequest, sharegpt_like_workload, with_fresh_prompts  # noqa: E402

RESULTS = HERE / "results"
LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1"}
SERVED_NAME = "bench"


@dataclass
class RequestResult:
    prompt_len: int
    ok: bool = False
    error: str | None = None
    ttft: float = 0.0
    latency: float = 0.0
    num_output_tokens: int = 0
    # Gaps between consecutive content chunks after the first.
    itl: list[float] = field(default_factory=list)


# ---- traffic ----------------------------------------------------------------------------------

def arrival_gaps(num: int, rate: float, burstiness: float, seed: int) -> list[float]:
    """Seconds before each request. Gamma gaps with mean 1/rate; shape 1 is Poisson, < 1 is
    burstier. An infinite rate sends everything at once."""
    if math.isinf(rate):
        return [0.0] * num
    rng = np.random.default_rng(seed)
    return rng.gamma(burstiness, 1.0 / (rate * burstiness), num).tolist()


async def send_one(client, url: str, model: str, request: BenchRequest,
                   ignore_eos: bool) -> RequestResult:
    import httpx2

    body = {"model": model, "prompt": request.prompt_token_ids, "max_tokens": request.output_len,
            "temperature": 0.0, "stream": True, "stream_options": {"include_usage": True}}
    if ignore_eos:
        body["ignore_eos"] = True
    result = RequestResult(prompt_len=len(request.prompt_token_ids))
    start = last = time.perf_counter()
    num_chunks = 0
    try:
        async with client.stream("POST", url, json=body) as response:
            if response.status_code != 200:
                await response.aread()
                result.error = f"HTTP {response.status_code}: {response.text[:200]}"
                return result
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[len("data: "):])
                if "error" in chunk:
                    result.error = str(chunk["error"])
                    return result
                now = time.perf_counter()
                if chunk.get("choices") and chunk["choices"][0].get("text"):
                    if num_chunks == 0:
                        result.ttft = now - start
                    else:
                        result.itl.append(now - last)
                    last = now
                    num_chunks += 1
                if chunk.get("usage"):
                    result.num_output_tokens = chunk["usage"]["completion_tokens"]
    except httpx2.HTTPError as exc:
        result.error = repr(exc)
        return result
    result.latency = time.perf_counter() - start
    result.num_output_tokens = result.num_output_tokens or num_chunks
    result.ok = num_chunks > 0
    return result


async def run_rate(base_url: str, model: str, requests: list[BenchRequest], rate: float,
                   burstiness: float, seed: int, ignore_eos: bool
                   ) -> tuple[list[RequestResult], float]:
    import httpx2

    url = base_url.rstrip("/") + "/v1/completions"
    gaps = arrival_gaps(len(requests), rate, burstiness, seed)
    limits = httpx2.Limits(max_connections=len(requests) + 1,
                           max_keepalive_connections=len(requests) + 1)
    async with httpx2.AsyncClient(timeout=None, limits=limits, trust_env=False) as client:
        start = time.perf_counter()
        tasks = []
        for gap, request in zip(gaps, requests):
            await asyncio.sleep(gap)
            tasks.append(asyncio.create_task(send_one(client, url, model, request, ignore_eos)))
        results = await asyncio.gather(*tasks)
        return list(results), time.perf_counter() - start


def summarize(results: list[RequestResult], duration: float) -> dict:
    done = [r for r in results if r.ok]

    def stats(values: list[float], scale: float = 1.0) -> dict:
        if not values:
            return {"mean": float("nan"), "median": float("nan"), "p99": float("nan")}
        arr = np.asarray(values) * scale
        return {"mean": float(arr.mean()), "median": float(np.median(arr)),
                "p99": float(np.percentile(arr, 99))}

    num_output = sum(r.num_output_tokens for r in done)
    tpots = [(r.latency - r.ttft) / (r.num_output_tokens - 1) for r in done
             if r.num_output_tokens > 1]
    return {
        "num_requests": len(results),
        "num_completed": len(done),
        "errors": sorted({r.error for r in results if r.error})[:5],
        "duration_s": duration,
        "prompt_tokens": sum(r.prompt_len for r in done),
        "output_tokens": num_output,
        "request_throughput": len(done) / duration,
        "output_throughput": num_output / duration,
        "ttft_ms": stats([r.ttft for r in done], 1e3),
        "tpot_ms": stats(tpots, 1e3),
        "itl_ms": stats([gap for r in done for gap in r.itl], 1e3),
        "e2e_latency_s": stats([r.latency for r in done]),
        "normalized_latency_s_per_token": float(np.mean(
            [r.latency / r.num_output_tokens for r in done if r.num_output_tokens]))
        if done else float("nan"),
    }


# ---- servers ----------------------------------------------------------------------------------

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
        env = {"PYTHONPATH": str(HERE.parent / "src") + os.pathsep
               + os.environ.get("PYTHONPATH", ""), "TOKENIZERS_PARALLELISM": "false"}
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


# ---- the sweep --------------------------------------------------------------------------------

def bench_server(label: str, base_url: str, model: str, args: argparse.Namespace,
                 requests: list[BenchRequest]) -> list[dict]:
    warmup = BenchRequest(requests[0].prompt_token_ids[:8], 4)
    asyncio.run(run_rate(base_url, model, [warmup], math.inf, 1.0, 0, args.ignore_eos))
    rows = []
    for index, rate in enumerate(args.request_rates):
        print(f"    {label}: {len(requests)} requests at {rate} req/s ...", flush=True)
        # New prompt ids (same lengths) at every rate: the same prompts again would be prefill
        # served from the prefix cache of the previous rate. Every server gets the same ones.
        prompts = with_fresh_prompts(requests, args.vocab_size, seed=args.seed + 1 + index)
        results, duration = asyncio.run(run_rate(base_url, model, prompts, rate,
                                                 args.burstiness, args.seed, args.ignore_eos))
        rows.append({"server": label, "request_rate": rate, **summarize(results, duration)})
        if rows[-1]["errors"]:
            print(f"    errors: {rows[-1]['errors']}", flush=True)
    return rows


def print_table(rows: list[dict]) -> None:
    def triple(d: dict, fmt: str = ".0f") -> str:
        return f"{d['mean']:{fmt}}/{d['median']:{fmt}}/{d['p99']:{fmt}}"

    header = (f"{'server':<9} {'rate':>5} {'done':>5} {'req/s':>6} {'out tok/s':>9} "
              f"{'TTFT ms':>15} {'TPOT ms':>12} {'ITL ms':>12} {'E2E s':>15} {'norm s/tok':>10}")
    print("\n" + header)
    print("-" * len(header))
    for r in rows:
        done = f"{r['num_completed']}/{r['num_requests']}"
        print(f"{r['server']:<9} {r['request_rate']:>5g} {done:>5} "
              f"{r['request_throughput']:>6.2f} {r['output_throughput']:>9.1f} "
              f"{triple(r['ttft_ms']):>15} {triple(r['tpot_ms']):>12} "
              f"{triple(r['itl_ms']):>12} {triple(r['e2e_latency_s'], '.2f'):>15} "
              f"{r['normalized_latency_s_per_token']:>10.3f}")
    print("(latencies: mean/median/p99; norm = mean of latency / output tokens)")


def sustained_rate(points: list[tuple[float, float]], limit: float) -> tuple[float, bool]:
    """The highest request rate at which a latency curve is still at or below `limit`,
    interpolated linearly towards the next measured rate, and whether the curve rises above
    `limit` within the measured rates.

    `points` are (rate, normalized latency) sorted by rate. The last point at or below the limit
    counts, not the first one above it, so one noisy point at a low rate does not hide a curve
    that stays low; a curve that never rises above gives its highest rate (the server sustains
    at least that), one above it everywhere gives 0.
    """
    below = [i for i, (_, latency) in enumerate(points) if latency <= limit]
    if not below:
        return 0.0, True
    i = below[-1]
    if i == len(points) - 1:
        return points[i][0], False
    (r0, l0), (r1, l1) = points[i], points[i + 1]
    return r0 + (limit - l0) / (l1 - l0) * (r1 - r0), True


def latency_curves(rows: list[dict]) -> dict[str, list[tuple[float, float]]]:
    """Per server, (request rate, normalized latency) at its finite rates, sorted by rate."""
    curves = {}
    for server in dict.fromkeys(r["server"] for r in rows):
        points = sorted((r["request_rate"], r["normalized_latency_s_per_token"]) for r in rows
                        if r["server"] == server and math.isfinite(r["request_rate"])
                        and math.isfinite(r["normalized_latency_s_per_token"]))
        if points:
            curves[server] = points
    return curves


def compare_sustained(rows: list[dict], factor: float) -> list[dict]:
    """Figure 12 read as numbers: for each server's latency limit (`factor` x its normalized
    latency at its lowest rate, where its latency "explodes"), the rate every server sustains
    under that same limit."""
    curves = latency_curves(rows)
    comparisons = []
    for reference, points in curves.items():
        limit = factor * points[0][1]
        rates = {}
        for server, curve in curves.items():
            rate, crossed = sustained_rate(curve, limit)
            rates[server] = {"rate": rate, "crossed": crossed, "lowest_rate": curve[0][0]}
        comparisons.append({"reference": reference, "limit_s_per_token": limit, "rates": rates})
    return comparisons


def sustained_text(entry: dict) -> str:
    """One server's sustained rate as read: '>=' when its curve never rises above the limit,
    'below' its lowest measured rate when it is above the limit everywhere."""
    if entry["rate"] == 0.0 and entry["crossed"]:
        return f"below {entry['lowest_rate']:g}"
    return f"{'' if entry['crossed'] else '>='}{entry['rate']:.2f}"


def print_sustained(comparisons: list[dict], factor: float) -> None:
    print(f"\nSustained request rate: the highest rate at which normalized latency stays at or "
          f"below {factor:g}x a server's own at its lowest rate (interpolated; '>=': it never "
          "rises above within the measured rates)")
    for c in comparisons:
        parts = [f"{server} {sustained_text(v)}" for server, v in c["rates"].items()]
        print(f"  limit {c['limit_s_per_token']:.3f} s/token ({factor:g}x {c['reference']}): "
              + ", ".join(parts) + " req/s")


def plot(rows: list[dict], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install matplotlib): no chart drawn")
        return False
    fig, ax = plt.subplots(figsize=(6, 4))
    for server, points in latency_curves(rows).items():
        ax.plot(*zip(*points), marker="o", label=server)
    ax.set_xlabel("request rate (req/s)")
    ax.set_ylabel("normalized latency (s/token)")
    ax.set_title("Normalized latency vs request rate (ShareGPT-like lengths)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def _finite(value):
    """NaN (no data, e.g. TPOT of one-token requests) becomes null and infinity (the all-at-once
    request rate) "inf": JSON has neither."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, float) and math.isinf(value):
        return "inf" if value > 0 else "-inf"
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def _nan_for_null(value):
    """The inverse of _finite, for results read back from JSON."""
    if value is None:
        return float("nan")
    if isinstance(value, dict):
        return {k: _nan_for_null(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_nan_for_null(v) for v in value]
    return value


def check_local(url: str) -> str:
    host = urllib.parse.urlparse(url).hostname
    if host not in LOCAL_HOSTS:
        raise SystemExit(f"error: --base-url must be on this machine (127.0.0.1), got {url}")
    return url


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
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
    parser.add_argument("--out", default=str(RESULTS / "serving.json"))
    parser.add_argument("--plot", default=None, help="PNG path (default: --out with .png)")
    parser.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                        help="benchmark nothing: read the results of earlier runs, then print, "
                             "write and plot them together")
    args = parser.parse_args()
    if args.merge:
        rows = [_nan_for_null(row) for path in args.merge
                for row in json.loads(Path(path).read_text())["results"]]
        report(rows, {"merged": args.merge}, {}, args)
        return

    if args.quick:
        args.num_prompts, args.request_rates = 12, [0.5, 1.0, 2.0]
        args.mean_input_len, args.mean_output_len, args.max_total_len = 40, 24, 128
    for spec in args.servers:
        name, _, dtype = spec.partition(":")
        if name not in ("pagedllm", "vllm") or dtype not in ("", "float32", "bfloat16"):
            parser.error(f"bad server {spec!r}: pagedllm or vllm[:float32|bfloat16]")
    if args.vllm_python and not any(s.startswith("vllm") for s in args.servers):
        args.servers.append("vllm")
    if args.model is None and args.base_url is None:
        sys.path.insert(0, str(HERE.parent / "src"))
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
        raise SystemExit("no server was benchmarked")
    config = {k: v for k, v in vars(args).items() if k not in ("out", "plot", "merge")}
    report(rows, config, startup, args)


def report(rows: list[dict], config: dict, startup: dict[str, float],
           args: argparse.Namespace) -> None:
    """Prints the table and the sustained rates, writes the JSON (--out) and the chart."""
    for row in rows:  # read back from JSON, an all-at-once rate is "inf"
        row["request_rate"] = float(row["request_rate"])
    print_table(rows)
    sustained = compare_sustained(rows, args.explode_factor)
    print_sustained(sustained, args.explode_factor)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(_finite({"config": config, "startup_s": startup,
                                       "results": rows, "sustained": sustained}), indent=2))
    print(f"\nwrote {out}")
    plot_path = Path(args.plot) if args.plot else out.with_suffix(".png")
    if plot(rows, plot_path):
        print(f"wrote {plot_path}")


if __name__ == "__main__":
    main()
