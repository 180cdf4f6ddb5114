"""The step's grammar bitmask applied to the logits (the model runner's side of the seam)."""

from __future__ import annotations

import numpy as np
import torch


def apply_grammar_bitmask(logits: torch.Tensor, bitmask: np.ndarray) -> None:
    """Sets the logits of the tokens a row's grammar forbids to -inf, in place.

    Args:
        logits: [num_rows, vocab] logits of the rows that sample, in `scheduled` order.
        bitmask: [num_rows, words] int32: bit j of word w allows token 32 * w + j. Rows of
            unconstrained sequences are all ones (-1) and are left alone; tokens past the
            bitmask's width are forbidden in the other rows.
    """
    rows = np.flatnonzero((bitmask != -1).any(axis=1))
    if rows.size == 0:
        return
    # E.g. word 0b101 -> bits [1, 0, 1, 0, ...]: token 0 and 2 allowed.
    words = bitmask[rows].astype("<i4", copy=False)  # little-endian: bytes in token order
    allowed = np.unpackbits(words.view(np.uint8), axis=1, bitorder="little")
    vocab = logits.shape[1]
    width = min(vocab, allowed.shape[1])
    forbidden = torch.ones(rows.size, vocab, dtype=torch.bool)  # [C, vocab]
    forbidden[:, :width] = torch.from_numpy(allowed[:, :width]) == 0
    index = torch.from_numpy(rows).to(logits.device)
    logits[index] = logits[index].masked_fill_(forbidden.to(logits.device), float("-inf"))
