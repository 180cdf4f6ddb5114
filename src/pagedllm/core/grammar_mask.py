"""The scheduler's side of structured outputs: each step's bitmask over the vocabulary, one row
per sequence that samples, from the grammar each constrained sequence holds."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from concurrent.futures import FIRST_COMPLETED, Future, wait

import numpy as np

from pagedllm.core.interface import ScheduledRequest
from pagedllm.core.request import Request


def build_grammar_bitmask(scheduled: list[ScheduledRequest],
                          requests: Mapping[str, Request]) -> np.ndarray | None:
    """[rows that sample, words] int32 in `scheduled` order, or None when none is constrained.

    E.g. scheduled [A prefill chunk (no sample), B decode (json), C decode (free)] -> 2 rows:
    row 0 B's grammar mask, row 1 all ones.
    """
    rows = [item for item in scheduled if item.sample]
    grammars = []
    for row, item in enumerate(rows):
        grammar = requests[item.request_id].seqs[item.seq_index].grammar
        if grammar is not None:
            grammars.append((row, grammar))
    if not grammars:
        return None
    vocab_size = grammars[0][1].vocab_size
    bitmask = np.full((len(rows), (vocab_size + 31) // 32), -1, dtype=np.int32)
    for row, grammar in grammars:
        assert grammar.vocab_size == vocab_size, "one backend's grammars share a vocabulary"
        grammar.fill_bitmask(bitmask, row)
    return bitmask


def wait_for_grammars(pending: Iterable[Future], timeout_s: float) -> None:
    """Blocks until one of the `pending` compiles is done, or `timeout_s` has passed."""
    wait(list(pending), timeout=timeout_s, return_when=FIRST_COMPLETED)
