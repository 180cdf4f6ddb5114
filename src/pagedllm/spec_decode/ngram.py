"""Prompt lookup: propose the tokens that followed the latest earlier match of the last n-gram."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def propose_ngram(token_ids: Sequence[int], k: int, min_n: int, max_n: int) -> list[int]:
    """Up to `k` tokens that followed the most recent earlier occurrence of the sequence's
    last n tokens, trying n = max_n down to min_n; [] when none matches.

    E.g. tokens [a b c d a b] with n = 2: `a b` occurred at 0, so the proposal is [c d a b][:k].
    """
    num_tokens = len(token_ids)
    if k < 1 or num_tokens <= min_n:
        return []
    tokens = np.asarray(token_ids, dtype=np.int64)
    for n in range(min(max_n, num_tokens - 1), min_n - 1, -1):
        suffix = tokens[num_tokens - n :]
        # Windows starting at 0 .. num_tokens - n - 1: every earlier occurrence, not the suffix.
        windows = np.lib.stride_tricks.sliding_window_view(tokens[: num_tokens - 1], n)
        hits = np.flatnonzero((windows == suffix).all(axis=1))
        if hits.size:
            start = int(hits[-1]) + n
            return tokens[start : start + k].tolist()
    return []
