"""StepProfiler: sections time their blocks when enabled and cost nothing recorded when not."""

from __future__ import annotations

import pytest

from pagedllm.profiler import StepProfiler


def test_enabled_sections_accumulate_and_nest() -> None:
    profiler = StepProfiler(enabled=True)
    for _ in range(3):
        with profiler.section("step"), profiler.section("schedule"):
            pass
    assert profiler.counts == {"step": 3, "schedule": 3}
    assert profiler.seconds["step"] >= profiler.seconds["schedule"] >= 0.0


def test_a_section_records_even_when_its_block_raises() -> None:
    profiler = StepProfiler(enabled=True)
    with pytest.raises(ValueError), profiler.section("forward"):
        raise ValueError("boom")
    assert profiler.counts["forward"] == 1


def test_disabled_sections_record_nothing() -> None:
    profiler = StepProfiler()
    with profiler.section("step"), profiler.section("schedule"):
        pass
    assert not profiler.seconds and not profiler.counts
    with pytest.raises(ValueError), profiler.section("forward"):
        raise ValueError("an exception still propagates")
