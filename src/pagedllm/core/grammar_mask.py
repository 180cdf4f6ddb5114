"""The scheduler's side of structured outputs: each step's bitmask over the vocabulary, one row
per sequence that samples, from the grammar each constrained sequence holds.

Where a core is left beside the forward pass's threads, the scheduler starts the fill on a
thread of its own (`GrammarMaskBuilder`) and returns at once; the model runner waits for it
only when it masks the logits, so the fill (the grammar library's work, done without the GIL)
overlaps the forward pass. Where the forward uses every core (as on 2 cores with 2 threads),
the fill's thread only takes a core from the forward's threads (measured: 0.883x of
unconstrained throughput overlapped against 0.921x filled in place), so it is filled in place.
The engine makes the choice (structured_output/manager.py: `grammar_mask_overlap`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait

import numpy as np

from pagedllm.core.interface import ScheduledRequest
from pagedllm.core.request import Request
from pagedllm.structured_output.backend import StructuredOutputGrammar

# (row of the bitmask, the grammar that fills it)
GrammarRows = list[tuple[int, StructuredOutputGrammar]]


def constrained_rows(scheduled: list[ScheduledRequest],
                     requests: Mapping[str, Request]) -> tuple[int, GrammarRows]:
    """(rows that sample, the constrained ones with their grammars), rows in `scheduled` order.

    E.g. scheduled [A prefill chunk (no sample), B decode (json), C decode (free)] ->
    (2, [(0, B's grammar)]).
    """
    rows = [item for item in scheduled if item.sample]
    grammars = []
    for row, item in enumerate(rows):
        grammar = requests[item.request_id].seqs[item.seq_index].grammar
        if grammar is not None:
            grammars.append((row, grammar))
    return len(rows), grammars


def fill_grammar_bitmask(num_rows: int, grammars: GrammarRows) -> np.ndarray:
    """[num_rows, words] int32: each grammar's row filled, the other rows all ones (-1)."""
    vocab_size = grammars[0][1].vocab_size
    bitmask = np.full((num_rows, (vocab_size + 31) // 32), -1, dtype=np.int32)
    by_class: dict[type, GrammarRows] = {}
    for row, grammar in grammars:
        assert grammar.vocab_size == vocab_size, "one backend's grammars share a vocabulary"
        by_class.setdefault(type(grammar), []).append((row, grammar))
    for cls, rows in by_class.items():
        cls.fill_bitmasks(rows, bitmask)
    return bitmask


class PendingGrammarBitmask:
    """A step's bitmask being filled on the mask thread; `result()` waits for it.

    It pickles as the finished array, so a step message sent to other processes (mp, ray)
    carries the array, and its encoder waits for the fill there (no overlap across processes).
    """

    __slots__ = ("_future",)

    def __init__(self, future: Future[np.ndarray]) -> None:
        self._future = future

    def result(self) -> np.ndarray:
        return self._future.result()

    def done(self) -> bool:
        return self._future.done()

    def __reduce_ex__(self, protocol):
        return self.result().__reduce_ex__(protocol)


class GrammarMaskBuilder:
    """Fills each step's bitmask on one thread of its own, started on first use, or in place
    when `overlap` is off (see the module's docstring).

    Invariant: at most one fill runs, and none while the scheduler touches a grammar: `wait()`
    comes first in `schedule` (forks copy grammars) and in `update_from_output` (accepted tokens
    advance them).
    """

    def __init__(self, overlap: bool = False) -> None:
        self.overlap = overlap
        self._executor: ThreadPoolExecutor | None = None
        self._pending: Future[np.ndarray] | None = None

    def start(self, scheduled: list[ScheduledRequest], requests: Mapping[str, Request]
              ) -> PendingGrammarBitmask | np.ndarray | None:
        """The step's bitmask, being filled (or filled, without overlap); None when no row is
        constrained."""
        self.wait()
        # NOTE: the grammars are looked up here: `requests` changes once schedule returns.
        num_rows, grammars = constrained_rows(scheduled, requests)
        if not grammars:
            return None
        if not self.overlap:
            return fill_grammar_bitmask(num_rows, grammars)
        if self._executor is None:
            self._executor = ThreadPoolExecutor(1, thread_name_prefix="pagedllm-mask")
        self._pending = self._executor.submit(fill_grammar_bitmask, num_rows, grammars)
        return PendingGrammarBitmask(self._pending)

    def wait(self) -> None:
        """Blocks until the last fill is done (its error, if any, is its step's to raise)."""
        if self._pending is not None:
            wait([self._pending])
            self._pending = None

    def shutdown(self) -> None:
        self.wait()
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None


def wait_for_grammars(pending: Iterable[Future], timeout_s: float) -> None:
    """Blocks until one of the `pending` compiles is done, or `timeout_s` has passed."""
    wait(list(pending), timeout=timeout_s, return_when=FIRST_COMPLETED)
