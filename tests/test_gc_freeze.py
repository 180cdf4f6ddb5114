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


IMPORT_PROBE = r"""
import gc
import sys
import weakref

class Node:
    pass

assert gc.isenabled() and gc.get_freeze_count() == 0
import pagedllm
assert "pagedllm.sampling_params" not in sys.modules
c, d = Node(), Node()  # the caller's garbage before the import: collected, not frozen
c.other, d.other = d, c
gone_before = weakref.ref(c)
del c, d
pagedllm.SamplingParams  # its first import: collection paused, then what is alive frozen
assert gc.isenabled()
assert gone_before() is None
frozen = gc.get_freeze_count()
assert frozen > 0
pagedllm.SamplingParams  # imported already: nothing more frozen (frozen objects may die)
assert gc.get_freeze_count() <= frozen
a, b = Node(), Node()  # made after the import: collected as ever, never frozen
a.other, b.other = b, a
gone = weakref.ref(a)
del a, b
gc.collect()
assert gone() is None and gc.get_freeze_count() <= frozen

from pagedllm import gc_freeze
gc_freeze.pause()  # a server's start: importing leaves collection paused
with gc_freeze.importing():
    import pagedllm.outputs
assert not gc.isenabled() and gc.get_freeze_count() > frozen
gc_freeze.start()
frozen = gc.get_freeze_count()
import torch  # from now on a first import freezes nothing
with gc_freeze.importing():
    import pagedllm.core.beam_search
assert gc.isenabled() and gc.get_freeze_count() <= frozen
print("ok")
"""


def test_a_first_import_before_torch_is_frozen_and_later_garbage_is_not():
    done = subprocess.run([sys.executable, "-c", IMPORT_PROBE], capture_output=True, text=True,
                          check=False, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["ok"]
