"""The serving benchmark's reading of Figure 12: where each latency curve explodes."""

from __future__ import annotations

import json
import math

import pytest

from pagedllm.benchmarks import serving
from pagedllm.benchmarks.serving_summary import (
    compare_sustained,
    sustained_rate,
    sustained_text,
)
from pagedllm.benchmarks.workloads import sharegpt_like_workload, with_fresh_prompts


def _row(server: str, rate: float, latency: float) -> dict:
    return {"server": server, "request_rate": rate, "normalized_latency_s_per_token": latency}


def test_sustained_rate_interpolates_after_the_last_point_below_the_limit():
    # 0.5 req/s is a noisy point above the limit; the curve is below it again until 1.0.
    points = [(0.25, 0.05), (0.5, 0.11), (1.0, 0.06), (1.5, 0.20)]
    rate, crossed = sustained_rate(points, 0.10)
    assert crossed
    assert rate == pytest.approx(1.0 + (0.10 - 0.06) / (0.20 - 0.06) * 0.5)


def test_sustained_rate_edges():
    assert sustained_rate([(0.5, 0.3), (1.0, 0.4)], 0.1) == (0.0, True)
    assert sustained_rate([(0.5, 0.05), (1.0, 0.06)], 0.1) == (1.0, False)
    assert sustained_rate([(0.5, 0.05), (1.0, 0.1)], 0.1) == (1.0, False)


def test_compare_sustained_uses_each_servers_low_rate_latency():
    rows = [_row("a", 0.5, 0.05), _row("a", 1.0, 0.07), _row("a", 2.0, 0.30),
            _row("a", math.inf, 0.5),  # all-at-once runs are not on the curve
            _row("b", 0.5, 0.10), _row("b", 1.0, 0.40), _row("b", 2.0, 0.90)]
    by_reference = {c["reference"]: c for c in compare_sustained(rows, 2.0)}
    a_limit = by_reference["a"]
    assert a_limit["limit_s_per_token"] == pytest.approx(0.10)
    assert a_limit["rates"]["a"]["rate"] == pytest.approx(1.0 + 0.03 / 0.23)
    # b's 0.5 is at the limit
    assert a_limit["rates"]["b"] == {"rate": 0.5, "crossed": True, "lowest_rate": 0.5}
    b_limit = by_reference["b"]
    assert b_limit["limit_s_per_token"] == pytest.approx(0.20)
    assert b_limit["rates"]["a"]["rate"] == pytest.approx(1.0 + 0.13 / 0.23)
    assert b_limit["rates"]["b"]["rate"] == pytest.approx(0.5 + 0.10 / 0.30 * 0.5)


def test_sustained_text_says_below_the_lowest_rate_instead_of_zero():
    rows = [_row("a", 0.5, 0.05), _row("a", 1.0, 0.30), _row("b", 0.5, 0.20), _row("b", 1.0, 0.5)]
    a_limit = {c["reference"]: c for c in compare_sustained(rows, 2.0)}["a"]
    assert sustained_text(a_limit["rates"]["b"]) == "below 0.5"  # 0.20 > 0.10 everywhere
    assert sustained_text(a_limit["rates"]["a"]) == "0.60"
    assert sustained_text({"rate": 1.0, "crossed": False, "lowest_rate": 0.5}) == ">=1.00"


def test_merge_reads_earlier_runs_back(tmp_path):
    stats = {"mean": 1.0, "median": 1.0, "p99": 1.0}
    nan_stats = {"mean": None, "median": None, "p99": None}  # as _finite writes NaN

    def saved_row(server, rate, latency):
        return {**_row(server, rate, latency), "num_requests": 4, "num_completed": 4,
                "errors": [], "request_throughput": 1.0, "output_throughput": 9.0,
                "ttft_ms": stats, "tpot_ms": nan_stats, "itl_ms": stats, "e2e_latency_s": stats}

    first, second = tmp_path / "a.json", tmp_path / "b.json"
    first.write_text(json.dumps({"results": [saved_row("a", 0.5, 0.05), saved_row("a", 1, 0.3)]}))
    second.write_text(json.dumps({"results": [saved_row("b", 0.5, 0.1),
                                              saved_row("b", "inf", 0.2)]}))
    out = tmp_path / "both.json"
    assert serving.main(["--merge", str(first), str(second), "--output-json", str(out),
                         "--plot", str(tmp_path / "c.png")]) == 0
    merged = json.loads(out.read_text())
    assert [(r["server"], r["request_rate"]) for r in merged["results"]] == [
        ("a", 0.5), ("a", 1.0), ("b", 0.5), ("b", "inf")]
    assert merged["results"][0]["tpot_ms"]["mean"] is None
    limits = {c["reference"]: c["rates"] for c in merged["sustained"]}
    assert limits["a"]["a"]["rate"] == pytest.approx(0.5 + 0.05 / 0.25 * 0.5)
    # inf is not on the curve
    assert limits["b"]["b"] == {"rate": 0.5, "crossed": False, "lowest_rate": 0.5}


def test_each_rate_gets_fresh_prompts_of_the_same_lengths():
    requests = sharegpt_like_workload(num_requests=8, seed=3)
    first, second = (with_fresh_prompts(requests, seed=s) for s in (1, 2))
    assert [len(r.prompt_token_ids) for r in first] == [len(r.prompt_token_ids) for r in requests]
    assert [r.output_len for r in first] == [r.output_len for r in requests]
    assert all(a.prompt_token_ids[:16] != b.prompt_token_ids[:16] for a, b in zip(first, second))
    assert with_fresh_prompts(requests, seed=1) == first  # seeded: every server gets the same
