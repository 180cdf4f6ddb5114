"""The KV cache map benchmark's CPU-accounting estimate (the arithmetic only: the benchmark
itself runs a server for minutes)."""

from __future__ import annotations

import pytest

from pagedllm.benchmarks.kv_map_overhead import cpu_accounting


def test_cpu_accounting_adds_the_changed_pools_json_and_divides_by_the_cores():
    # 0.40 ms per idle keep-alive poll, and the JSON of a pool changed since the last poll
    # costs 0.201 ms more than an unchanged one: 0.601 ms per poll, 6.01 ms a second at 10 Hz,
    # 0.601% of one core, 0.3005% of the engine's two.
    ab = {"server_cpu_ms_per_poll_keep_alive": 0.40, "engine_cores": 2}
    cost = {"json_ms": 0.202, "json_unchanged_ms": 0.001}
    estimate = cpu_accounting(ab, cost, hz=10.0)
    assert estimate["server_cpu_ms_per_poll"] == pytest.approx(0.601)
    assert estimate["cost_share_one_core"] == pytest.approx(0.00601)
    assert estimate["cost_share"] == pytest.approx(0.003005)
    assert estimate["engine_cores"] == 2
    # Without the in-process timings (--skip-per-poll): the idle poll alone, at 4 Hz.
    assert cpu_accounting(ab, None, hz=4.0)["cost_share"] == pytest.approx(0.0008)
