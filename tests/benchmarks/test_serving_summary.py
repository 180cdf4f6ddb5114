"""The serving benchmark's reading of Figure 12: where each latency curve explodes."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "serving.py"
_spec = importlib.util.spec_from_file_location("serving_benchmark", _PATH)
serving = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = serving  # its dataclasses look their module up
_spec.loader.exec_module(serving)


def _row(server: str, rate: float, latency: float) -> dict:
    return {"server": server, "request_rate": rate, "normalized_latency_s_per_token": latency}


def test_sustained_rate_interpolates_the_first_crossing():
    points = [(0.5, 0.05), (1.0, 0.06), (1.5, 0.20), (2.0, 0.08)]
    rate, crossed = serving.sustained_rate(points, 0.10)
    assert crossed
    assert rate == pytest.approx(1.0 + (0.10 - 0.06) / (0.20 - 0.06) * 0.5)


def test_sustained_rate_edges():
    assert serving.sustained_rate([(0.5, 0.3), (1.0, 0.4)], 0.1) == (0.0, True)
    assert serving.sustained_rate([(0.5, 0.05), (1.0, 0.06)], 0.1) == (1.0, False)


def test_compare_sustained_uses_each_servers_low_rate_latency():
    rows = [_row("a", 0.5, 0.05), _row("a", 1.0, 0.07), _row("a", 2.0, 0.30),
            _row("a", math.inf, 0.5),  # all-at-once runs are not on the curve
            _row("b", 0.5, 0.10), _row("b", 1.0, 0.40), _row("b", 2.0, 0.90)]
    by_reference = {c["reference"]: c for c in serving.compare_sustained(rows, 2.0)}
    a_limit = by_reference["a"]
    assert a_limit["limit_s_per_token"] == pytest.approx(0.10)
    assert a_limit["rates"]["a"]["rate"] == pytest.approx(1.0 + 0.03 / 0.23)
    assert a_limit["rates"]["b"] == {"rate": 0.5, "crossed": True}
    b_limit = by_reference["b"]
    assert b_limit["limit_s_per_token"] == pytest.approx(0.20)
    assert b_limit["rates"]["a"]["rate"] == pytest.approx(1.0 + 0.13 / 0.23)
    assert b_limit["rates"]["b"]["rate"] == pytest.approx(0.5 + 0.10 / 0.30 * 0.5)
