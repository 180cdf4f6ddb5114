"""The serving benchmark's reading of its results: per-rate statistics, the table, the rate
each server sustains below a latency limit (Figure 12 read as numbers), and the chart."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from pagedllm.benchmarks.serving_client import RequestResult


def summarize(results: list[RequestResult], duration: float) -> dict:
    """One rate's row: throughput and latency statistics of the requests that completed."""
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


def finite_for_json(value):
    """NaN (no data, e.g. TPOT of one-token requests) becomes null and infinity (the all-at-once
    request rate) "inf": JSON has neither."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, float) and math.isinf(value):
        return "inf" if value > 0 else "-inf"
    if isinstance(value, dict):
        return {k: finite_for_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [finite_for_json(v) for v in value]
    return value


def nan_for_null(value):
    """The inverse of finite_for_json, for results read back from JSON."""
    if value is None:
        return float("nan")
    if isinstance(value, dict):
        return {k: nan_for_null(v) for k, v in value.items()}
    if isinstance(value, list):
        return [nan_for_null(v) for v in value]
    return value
