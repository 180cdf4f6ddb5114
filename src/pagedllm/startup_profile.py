"""Start-up phases: where the time goes from process start to ready (issue 30).

The engine's start path calls mark(phase) at the end of each phase; a mark is a wall-clock
timestamp appended to a list, so it stays always on (a few hundred nanoseconds each).
`pagedllm bench startup` reads them back in a fresh process (phases()) and times each phase
from the one before it; the first from the process's start, which the launcher passes in
PAGEDLLM_STARTUP_T0 (time.time() before it started the process). A server started so prints
its phases once it is about to listen (`report`: a `STARTUP {json}` line on stderr), e.g.
`PAGEDLLM_STARTUP_T0=$(date +%s.%N) pagedllm serve`.
"""

from __future__ import annotations

import json
import os
import sys
import time

START_ENV = "PAGEDLLM_STARTUP_T0"

_marks: list[tuple[str, float]] = []


def mark(phase: str) -> None:
    """Records that `phase` has just ended."""
    _marks.append((phase, time.time()))


def process_start() -> float | None:
    """time.time() at the process's start as its launcher set it, or None."""
    value = os.environ.get(START_ENV)
    return float(value) if value else None


def phases() -> list[tuple[str, float]]:
    """(phase, seconds) for each mark so far, each timed from the mark before it; the first
    from the process start (PAGEDLLM_STARTUP_T0) where it is known, otherwise left out."""
    out = []
    previous = process_start()
    for phase, at in _marks:
        if previous is not None:
            out.append((phase, at - previous))
        previous = at
    return out


REPORT_PREFIX = "STARTUP "


def report() -> None:
    """Prints the phases so far as one `STARTUP {"phases": [[phase, seconds], ...]}` line on
    stderr, where the launcher gave the process's start (PAGEDLLM_STARTUP_T0); nothing
    otherwise."""
    if process_start() is not None:
        print(REPORT_PREFIX + json.dumps({"phases": phases()}), file=sys.stderr, flush=True)
