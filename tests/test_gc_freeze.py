"""A server's start-up heap kept out of full collections (pagedllm/gc_freeze.py): collection
paused while it starts, one collection and a freeze when ready, later freezes only after that.
Each case runs in a fresh interpreter (freezing the test session's heap would keep its garbage)."""

from __future__ import annotations

import subprocess
import sys

PROBE = r"""
import gc
import weakref
from pagedllm import gc_freeze

class Node:
    pass

gc_freeze.settle()  # before start: leaves the collector alone
assert gc.get_freeze_count() == 0 and gc.isenabled()
gc_freeze.pause()
assert not gc.isenabled()
a, b = Node(), Node()
a.other, b.other = b, a
gone = weakref.ref(a)
del a, b  # a cycle: garbage the ready-time collection must free, not freeze
kept = [Node() for _ in range(1000)]
gc_freeze.start()
assert gc.isenabled()
frozen = gc.get_freeze_count()
assert frozen >= 1000, frozen
assert gone() is None
later = [Node() for _ in range(500)]
assert all(gc.is_tracked(o) for o in later)
gc_freeze.settle()
assert gc.get_freeze_count() >= frozen + 500, (gc.get_freeze_count(), frozen)
print("ok")
"""


def test_the_start_up_heap_is_collected_once_then_frozen():
    done = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True,
                          check=False,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["ok"]
