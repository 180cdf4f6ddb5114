"""What the web page's KV cache map costs the engine: GET /kv_cache/blocks at 10 Hz.

Three measurements, side by side in one run:
  1. A/B through a live server (`pagedllm serve`, the shipped SmolLM2 by default, its default
     KV pool: thousands of blocks): rounds of --num-requests concurrent completions
     (--max-tokens each, ignore_eos), alternately with and without a client polling
     /kv_cache/blocks at --poll-hz over one keep-alive connection, as the page's fetches do
     (--new-connection-per-poll: a TCP connection each); generated tokens per second per
     round. Then the server process's CPU per poll with the engine idle, both ways, beside
     plain /health; with --baseline-src, also of a second server run from another source tree
     (e.g. an older commit's src/), in the same rounds.
  2. The cost of one poll, in process on the same settings with the pool part full: the engine
     thread's copy (LLMEngine.get_kv_cache_snapshot) and the JSON built on the event loop
     (web_page.KVMapEncoder: first poll, a poll one step after the last, an unchanged
     snapshot).
  3. The CPU-accounting estimate of the throughput cost: the server's CPU per poll (idle,
     keep-alive, plus what the JSON costs more when the pool changed between polls) x
     --poll-hz / the engine's cores (the cores the server may run on, or --engine-cores), and
     the same over one core (the bound if every poll stalls a whole step: the engine's threads
     wait for each other at every operation).
The A/B numbers on a shared machine are noisy (a round's spread is often above 1%, and the
poller itself, a client on the same cores, competes with the engine too); the CPU per poll is
the precise one.

    flock /tmp/pagedllm-bench.lock python -m pagedllm.benchmarks.kv_map_overhead
    python -m pagedllm.benchmarks.kv_map_overhead --rounds 2 --num-kv-blocks 2048

Prints a table and writes JSON to --output-json (default benchmarks/results/kv_map_overhead.json).
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

RESULTS = Path("benchmarks", "results")
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _post(url: str, body: dict, timeout: float = 600) -> dict:
    request = urllib.request.Request(url, json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    with _OPENER.open(request, timeout=timeout) as response:
        return json.loads(response.read())


def _get(url: str, timeout: float = 60) -> bytes:
    with _OPENER.open(url, timeout=timeout) as response:
        return response.read()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Getter:
    """GETs of one server: over one keep-alive connection (as a browser's fetches), or a new
    connection each (`keep_alive` False)."""

    def __init__(self, url: str, keep_alive: bool = True) -> None:
        self.url = url
        self._conn = (http.client.HTTPConnection(url.removeprefix("http://"), timeout=60)
                      if keep_alive else None)

    def get(self, path: str) -> bytes:
        if self._conn is None:
            return _get(self.url + path)
        self._conn.request("GET", path)
        response = self._conn.getresponse()
        body = response.read()
        if response.status != 200:
            raise OSError(f"GET {path}: HTTP {response.status}")
        return body

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()


class Poller:
    """GET `path` at `hz` on its own thread; records latencies and sizes."""

    def __init__(self, url: str, hz: float, path: str = "/kv_cache/blocks",
                 keep_alive: bool = True) -> None:
        self.getter, self.path, self.period = Getter(url, keep_alive), path, 1.0 / hz
        self.latencies: list[float] = []
        self.num_bytes = 0
        self.cpu_s = 0.0  # the poller thread's own CPU (the client's side)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self.getter.close()

    def _run(self) -> None:
        next_at = time.monotonic()
        while not self._stop.is_set():
            start, start_cpu = time.monotonic(), time.thread_time()
            self.num_bytes = len(self.getter.get(self.path))
            self.cpu_s += time.thread_time() - start_cpu
            self.latencies.append(time.monotonic() - start)
            next_at += self.period
            self._stop.wait(max(0.0, next_at - time.monotonic()))


class Load:
    """--num-requests client threads, each sending completions back to back until stopped:
    a steady batch, so that throughput can be compared over short windows."""

    def __init__(self, url: str, args: argparse.Namespace) -> None:
        self.url, self.args = url, args
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True)
                         for i in range(args.num_requests)]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join()

    def _run(self, i: int) -> None:
        n = 0
        while not self._stop.is_set():
            body = {"model": "bench", "prompt": f"Client {i}, request {n}: tell a long story.",
                    "max_tokens": self.args.max_tokens, "ignore_eos": True,
                    "temperature": 1.0, "seed": n}
            _post(self.url + "/v1/completions", body)
            n += 1


def _generated(url: str) -> tuple[float, int]:
    stats = json.loads(_get(url + "/kv_cache/blocks"))["stats"]
    return time.perf_counter(), stats["num_generation_tokens"]


@contextlib.contextmanager
def _server(args: argparse.Namespace, name: str, src: str | None = None
            ) -> Iterator[tuple[str, int]]:
    """A `pagedllm serve` (from the source tree `src`, else this one) until the block ends:
    its URL and process id. Its log goes beside --output-json."""
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "pagedllm", "serve", "--port", str(port),
               "--served-model-name", "bench", "--log-stats-interval", "3600"]
    if args.model:
        command.insert(4, args.model)
    if args.num_kv_blocks:
        command += ["--num-kv-blocks", str(args.num_kv_blocks)]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    if src is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(Path(src).resolve())]
                                            + env.get("PYTHONPATH", "").split(os.pathsep))
    log_path = Path(args.output_json).with_suffix(f".{name}.log")
    with open(log_path, "w") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            _wait_ready(url, proc)
            yield url, proc.pid
        finally:
            proc.terminate()
            proc.wait(timeout=30)


def serve_ab(args: argparse.Namespace) -> dict:
    with _server(args, "server") as (url, pid), contextlib.ExitStack() as stack:
        result = _ab_rounds(url, args, pid)
        result["engine_cores"] = args.engine_cores or len(os.sched_getaffinity(pid))
        servers = {"": (url, pid)}
        if args.baseline_src:  # started after the A/B: an idle server costs nothing, a
            # starting one does
            servers["baseline_"] = stack.enter_context(_server(args, "baseline",
                                                               args.baseline_src))
        # Rounds of every way in turn, each way's median: a slow minute on this shared
        # machine lands on one round of every way.
        samples: dict[str, list[float]] = {}
        for _ in range(args.cpu_rounds):
            for prefix, (server_url, server_pid) in servers.items():
                for keep_alive in (True, False):
                    name = "keep_alive" if keep_alive else "new_connection"
                    for path in ("/kv_cache/blocks", "/health"):
                        key = f"{prefix}server_cpu_ms_per_poll_{name}" + (
                            "_health" if path == "/health" else "")
                        samples.setdefault(key, []).append(
                            _server_cpu_per_poll(server_url, server_pid, path, keep_alive))
        result.update({key: statistics.median(values) for key, values in samples.items()})
        result["server_cpu_ms_per_poll_rounds"] = samples
        return result


def _wait_ready(url: str, proc: subprocess.Popen, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            _get(url + "/health", timeout=2)
            return
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the server did not start; see its log") from None
            time.sleep(0.5)


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process, all its threads (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _server_cpu_per_poll(url: str, pid: int, path: str, keep_alive: bool,
                         num_polls: int = 500, max_s: float = 5.0) -> float:
    """CPU milliseconds the server process spends per GET of `path` (HTTP, the engine thread's
    copy, the JSON), with the engine idle and its pool as the load left it; less its idle CPU
    over the same time. (/health: the HTTP round trip alone.) `num_polls` back to back, or as
    many as `max_s` allows (a slow server: one whose polls wait for delayed ACKs)."""
    getter = Getter(url, keep_alive)
    try:
        getter.get(path)
        start_cpu, start = _cpu_s(pid), time.perf_counter()
        for done in range(1, num_polls + 1):
            getter.get(path)
            if time.perf_counter() - start > max_s:
                break
        num_polls = done
        busy_cpu, elapsed = _cpu_s(pid) - start_cpu, time.perf_counter() - start
    finally:
        getter.close()
    idle_start = _cpu_s(pid)
    time.sleep(elapsed)
    idle_cpu = _cpu_s(pid) - idle_start
    return 1e3 * max(busy_cpu - idle_cpu, 0.0) / num_polls


def _paired_cost(off: list[float], on: list[float], higher_is_better: bool) -> tuple[float, float]:
    """Mean and standard error of each pair's relative cost of polling."""
    costs = [1.0 - b / a if higher_is_better else b / a - 1.0 for a, b in zip(off, on)]
    stderr = statistics.stdev(costs) / len(costs) ** 0.5 if len(costs) > 1 else float("nan")
    return statistics.fmean(costs), stderr


def _ab_rounds(url: str, args: argparse.Namespace, pid: int) -> dict:
    """Windows of --window-s under a steady load, the poller on in every other one (the order
    within each pair alternates). Per window: tokens per second from the engine's own count,
    and the server process's CPU seconds per generated token (less sensitive to other load on
    the machine than wall time: what polling adds to the server's work per token)."""
    load = Load(url, args)
    load.start()
    rates: dict[str, list[float]] = {"off": [], "on": []}
    cpu_per_token: dict[str, list[float]] = {"off": [], "on": []}
    latencies: list[float] = []
    size = num_blocks = 0
    poller_cpu_s = 0.0
    try:
        time.sleep(args.window_s)  # warm-up: the batch fills
        for index in range(args.rounds):
            for arm in (("off", "on") if index % 2 == 0 else ("on", "off")):
                poller = (Poller(url, args.poll_hz, args.poll_path,
                                 not args.new_connection_per_poll) if arm == "on" else None)
                start, before = _generated(url)
                start_cpu = _cpu_s(pid)
                if poller is not None:
                    poller.start()
                time.sleep(args.window_s)
                if poller is not None:
                    poller.stop()
                    latencies += poller.latencies
                    size = poller.num_bytes
                    poller_cpu_s += poller.cpu_s
                end, after = _generated(url)
                end_cpu = _cpu_s(pid)
                rates[arm].append((after - before) / (end - start))
                cpu_per_token[arm].append(1e3 * (end_cpu - start_cpu) / max(after - before, 1))
            print(f"window pair {index}: off {rates['off'][-1]:.1f}, on {rates['on'][-1]:.1f} "
                  f"tokens/s; off {cpu_per_token['off'][-1]:.2f}, on "
                  f"{cpu_per_token['on'][-1]:.2f} CPU ms/token", file=sys.stderr)
        num_blocks = json.loads(_get(url + "/kv_cache/blocks"))["device"]["num_blocks"]
    finally:
        load.stop()
    # Paired: each pair's on/off ratio, so a drift in the machine's load cancels within it.
    mean, stderr = _paired_cost(rates["off"], rates["on"], higher_is_better=True)
    cpu_mean, cpu_stderr = _paired_cost(cpu_per_token["off"], cpu_per_token["on"],
                                        higher_is_better=False)
    return {"num_blocks": num_blocks, "rates": rates, "cpu_ms_per_token": cpu_per_token,
            "median_off": statistics.median(rates["off"]),
            "median_on": statistics.median(rates["on"]),
            "overhead_mean": mean, "overhead_stderr": stderr,
            "cpu_per_token_median_off": statistics.median(cpu_per_token["off"]),
            "cpu_per_token_median_on": statistics.median(cpu_per_token["on"]),
            "cpu_overhead_mean": cpu_mean, "cpu_overhead_stderr": cpu_stderr,
            "poll_latency_ms_median": 1e3 * statistics.median(latencies),
            "poller_cpu_ms_per_poll": 1e3 * poller_cpu_s / max(len(latencies), 1),
            "response_bytes": size}


def per_poll_cost(args: argparse.Namespace) -> dict:
    """Times one snapshot (engine thread) and its JSON (event loop), pool part full: a first
    poll, a poll one engine step after the last one (a busy engine polled at 10 Hz), and one
    of an unchanged snapshot (an idle engine, or two pages within one step)."""
    from pagedllm import SamplingParams
    from pagedllm.engine.llm_engine import LLMEngine
    from pagedllm.entrypoints.openai.web_page import KVMapEncoder

    kwargs = {"model": args.model} if args.model else {}
    if args.num_kv_blocks:
        kwargs["num_kv_blocks"] = args.num_kv_blocks
    engine = LLMEngine(**kwargs)
    # Long enough that every request still runs (holding blocks) after the steps below.
    params = SamplingParams(max_tokens=1000, ignore_eos=True, n=2)
    for i in range(args.num_requests):
        engine.add_request(str(i), f"Request {i}: tell a long story. " * 8, params)
    step_times = []
    snapshots = []  # one per step, after the prompts are in
    for step in range(40):
        start = time.perf_counter()
        engine.step()
        step_times.append(time.perf_counter() - start)
        if step >= 8:
            snapshots.append(engine.get_kv_cache_snapshot())

    def timed(fn, n: int = 50) -> float:
        times = []
        for _ in range(n):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    snapshot, stats = snapshots[-1]
    copy_s = timed(engine.get_kv_cache_snapshot)
    first_s = timed(lambda: KVMapEncoder().body(snapshot, stats))
    # Each poll one step after the last: the encoder saw the previous step's snapshot.
    next_times = []
    for _ in range(5):
        encoder = KVMapEncoder()
        encoder.body(*snapshots[0])
        for snap, snap_stats in snapshots[1:]:
            start = time.perf_counter()
            encoder.body(snap, snap_stats)
            next_times.append(time.perf_counter() - start)
    next_s = statistics.median(next_times)
    encoder = KVMapEncoder()
    encoder.body(snapshot, stats)
    same_s = timed(lambda: encoder.body(snapshot, stats))
    blocks_s = timed(lambda: KVMapEncoder().body(snapshot, stats, "blocks"), 10)
    return {"num_blocks": stats.num_blocks, "num_used_blocks":
            stats.num_blocks - stats.num_free_blocks, "snapshot_ms": 1e3 * copy_s,
            "json_first_poll_ms": 1e3 * first_s, "json_ms": 1e3 * next_s,
            "json_unchanged_ms": 1e3 * same_s, "json_blocks_layout_ms": 1e3 * blocks_s,
            "step_ms_median": 1e3 * statistics.median(step_times[8:]),
            "cpu_share_at_poll_hz": args.poll_hz * (copy_s + next_s),
            "cpu_share_blocks_layout": args.poll_hz * (copy_s + blocks_s)}


def cpu_accounting(ab: dict, cost: dict | None, hz: float) -> dict:
    """The throughput cost the CPU per poll implies: the idle server's CPU per keep-alive poll
    (HTTP, the snapshot, an unchanged pool's JSON), plus what the JSON costs more one step
    after the last poll (a busy engine's), x `hz`, over the engine's cores and over one."""
    extra_ms = cost["json_ms"] - cost["json_unchanged_ms"] if cost is not None else 0.0
    per_poll_ms = ab["server_cpu_ms_per_poll_keep_alive"] + max(extra_ms, 0.0)
    share_of_one_core = per_poll_ms * hz / 1e3
    return {"server_cpu_ms_per_poll": per_poll_ms, "engine_cores": ab["engine_cores"],
            "cost_share": share_of_one_core / ab["engine_cores"],
            "cost_share_one_core": share_of_one_core}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model (default: the shipped SmolLM2)")
    parser.add_argument("--num-kv-blocks", type=int, default=None,
                        help="pool size (default: the engine's default)")
    parser.add_argument("--num-requests", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--rounds", type=int, default=20, help="pairs of windows (off, on)")
    parser.add_argument("--window-s", type=float, default=3.0, help="seconds per window")
    parser.add_argument("--poll-hz", type=float, default=10.0)
    parser.add_argument("--poll-path", default="/kv_cache/blocks",
                        help="what the poller asks for (/health: the HTTP round trip alone)")
    parser.add_argument("--cpu-rounds", type=int, default=5,
                        help="rounds of the idle server's CPU per poll (each way's median)")
    parser.add_argument("--new-connection-per-poll", action="store_true",
                        help="the A/B poller opens a connection per poll (the page keeps one)")
    parser.add_argument("--baseline-src", default=None,
                        help="also measure the CPU per poll of a server run from this source "
                             "tree (a folder holding pagedllm/, e.g. an older commit's src/)")
    parser.add_argument("--engine-cores", type=int, default=None,
                        help="the engine's cores for the CPU-accounting estimate (default: "
                             "the cores the server may run on)")
    parser.add_argument("--skip-per-poll", action="store_true",
                        help="only the A/B through the server, not the in-process timings")
    parser.add_argument("--output-json", default=str(RESULTS / "kv_map_overhead.json"))
    args = parser.parse_args(argv)
    for name in ("num_requests", "max_tokens", "rounds", "window_s", "cpu_rounds"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be at least 1")
    if not args.poll_hz > 0:
        raise SystemExit("--poll-hz must be above 0")
    if args.engine_cores is not None and args.engine_cores < 1:
        raise SystemExit("--engine-cores must be at least 1")
    if args.baseline_src and not Path(args.baseline_src, "pagedllm").is_dir():
        raise SystemExit(f"--baseline-src {args.baseline_src} holds no pagedllm/ folder")
    Path(args.output_json).parent.mkdir(parents=True, exist_ok=True)
    ab = serve_ab(args)
    cost = None if args.skip_per_poll else per_poll_cost(args)
    hz = args.poll_hz
    estimate = cpu_accounting(ab, cost, hz)
    result = {"settings": vars(args), "serve_ab": ab, "per_poll": cost,
              "cpu_accounting": estimate}
    Path(args.output_json).write_text(json.dumps(result, indent=2))
    print(f"\n{args.poll_path} at {hz:g} Hz, {ab['num_blocks']} device blocks, "
          f"{args.num_requests} concurrent requests x {args.max_tokens} tokens")
    print("| measurement | value |")
    print("|---|---|")
    print(f"| generation, no poller (median of {args.rounds} windows) | "
          f"{ab['median_off']:.1f} tokens/s |")
    print(f"| generation, polled at {hz:g} Hz (median) | {ab['median_on']:.1f} tokens/s |")
    print(f"| A/B throughput cost (mean of paired windows +- stderr) | "
          f"{100 * ab['overhead_mean']:+.2f}% +- {100 * ab['overhead_stderr']:.2f}% |")
    print(f"| CPU-accounting estimate of the throughput cost at {hz:g} Hz: "
          f"{estimate['server_cpu_ms_per_poll']:.2f} ms per poll x {hz:g} Hz / "
          f"{estimate['engine_cores']} engine cores (over one core) | "
          f"{100 * estimate['cost_share']:.2f}% ({100 * estimate['cost_share_one_core']:.2f}%) |")
    print(f"| server CPU per generated token, off / on (medians) | "
          f"{ab['cpu_per_token_median_off']:.2f} / {ab['cpu_per_token_median_on']:.2f} ms |")
    print(f"| A/B CPU cost per token (mean of paired windows +- stderr) | "
          f"{100 * ab['cpu_overhead_mean']:+.2f}% +- {100 * ab['cpu_overhead_stderr']:.2f}% |")
    print(f"| poll latency (median) / response | {ab['poll_latency_ms_median']:.1f} ms / "
          f"{ab['response_bytes'] / 1024:.0f} KiB |")
    print(f"| poller's connection / its own CPU per poll (a client on the same cores) | "
          f"{'new per poll' if args.new_connection_per_poll else 'one, keep-alive'} / "
          f"{ab['poller_cpu_ms_per_poll']:.2f} ms |")
    servers = [("", "")] + ([("baseline_", f" ({args.baseline_src})")]
                            if args.baseline_src else [])
    for prefix, which in servers:
        for name, label in (("keep_alive", "keep-alive"), ("new_connection", "new connection")):
            blocks = ab[f"{prefix}server_cpu_ms_per_poll_{name}"]
            health = ab[f"{prefix}server_cpu_ms_per_poll_{name}_health"]
            print(f"| server{which} process CPU per poll, idle engine, {label} (/health alone), "
                  f"median of {args.cpu_rounds} | "
                  f"{blocks:.2f} ms ({health:.2f} ms): {blocks * hz / 10:.2f}% of one core at "
                  f"{hz:g} Hz |")
    if cost is not None:
        print(f"| snapshot on the engine thread ({cost['num_blocks']} blocks, "
              f"{cost['num_used_blocks']} used) | {cost['snapshot_ms']:.3f} ms |")
        print(f"| JSON on the event loop, a step after the last poll / first poll / unchanged | "
              f"{cost['json_ms']:.3f} / {cost['json_first_poll_ms']:.3f} / "
              f"{cost['json_unchanged_ms']:.3f} ms |")
        print(f"| JSON of ?layout=blocks | {cost['json_blocks_layout_ms']:.1f} ms |")
        print(f"| engine step (median, in process) | {cost['step_ms_median']:.1f} ms |")
    print(f"wrote {args.output_json}")


if __name__ == "__main__":
    main()
