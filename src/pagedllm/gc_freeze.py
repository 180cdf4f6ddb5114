"""A server's long-lived objects kept out of the garbage collector's full collections.

A full (generation 2) collection traverses every object the collector tracks. A served process
holds torch's, transformers' and the server's modules, the tokenizers and llguidance's token
tables: a full collection of them took 0.2-0.5 s on two shared cores, all with the GIL held.
Python runs one when enough objects have survived since the last, so the request whose
allocations tip the count (the validation of a 100,000-word `choice` constraint, say) stops
every running stream for that long, and which request that is depends on everything the
process allocated before it (tests/entrypoints/test_grammar_compile_stall.py).

So a server pauses automatic collection while it starts (`pause`: its full collections
traversed everything imported and loaded so far, several times over a start), collects once
when it is ready (`start`) and freezes what is left (gc.freeze: the collector never traverses
those objects again), and freezes again (`settle`) once it has
built what lives as long as the process on a first request (transformers' tokenizer and
llguidance's tables, structured_output/manager.py). Full collections then traverse what
requests made since, milliseconds. A process that has not called `start` (a script's `LLM`,
a test session's many engines) is left alone: freezing there would keep garbage forever.

Imports are the exception (`importing`): importing torch and the engine leaves ~260,000
objects the collector tracks, nearly all modules, functions and classes that live as long as
the process, and its full collections traversed them several times over an import and an
`LLM()` build (0.2-0.5 s of a warm start on two shared cores). So the first import of
pagedllm's engine (pagedllm.__getattr__, `pagedllm serve`) runs with collection paused and
freezes what is alive after it. Only where torch is not imported yet: then the caller has
made no model, tensor or engine that could turn into garbage later, and its heap is small; it
is collected before the import (milliseconds), not after it (the garbage an import leaves is a
few dozen objects), so nothing of the caller's is kept forever, and an engine built later (the
memory a test session frees) is never frozen by it. A caller that imported torch first (a test
session, a script) is left alone.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import sys
import time
from collections.abc import Iterator

logger = logging.getLogger(__name__)

_started = False
_paused = False


def pause() -> None:
    """Stops automatic collection until `start` (a server's start-up)."""
    global _paused
    if gc.isenabled():
        gc.disable()
        _paused = True


@contextlib.contextmanager
def importing() -> Iterator[None]:
    """Where torch is not imported yet: collects, runs the block (a first import) with automatic
    collection paused, then freezes every object alive, uncollected (see the module
    docstring), and restores collection as it was. Otherwise just runs the block."""
    if "torch" in sys.modules:
        yield
        return
    was_enabled = gc.isenabled()
    gc.disable()
    gc.collect()
    try:
        yield
    finally:
        gc.freeze()
        if was_enabled:
            gc.enable()


def start() -> None:
    """Collects once, freezes every object left and turns automatic collection on again (where
    `pause` turned it off); from then on `settle` freezes too."""
    global _started, _paused
    began = time.perf_counter()
    gc.collect()
    gc.freeze()
    if _paused:
        gc.enable()
        _paused = False
    _started = True
    logger.debug("gc: %d objects frozen at start (%.0f ms)", gc.get_freeze_count(),
                 1e3 * (time.perf_counter() - began))


def settle() -> None:
    """After building objects that live as long as the process: freezes them (and whatever
    else is alive now) where `start` was called; nothing otherwise."""
    if _started:
        gc.collect(1)  # the young garbage first (older garbage made since `start` stays)
        gc.freeze()
        logger.debug("gc: %d objects frozen", gc.get_freeze_count())
