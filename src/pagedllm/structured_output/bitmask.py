"""The step's grammar bitmask applied to the logits (the model runner's side of the seam)."""

from __future__ import annotations

import numpy as np
import torch

# Bit value -> what is added to the logit: a forbidden token (0) gets -inf.
_PENALTY = np.array([-np.inf, 0.0], dtype=np.float32)


def apply_grammar_bitmask(logits: torch.Tensor, bitmask: np.ndarray) -> None:
    """Sets the logits of the tokens a row's grammar forbids to -inf, in place.

    Args:
        logits: [num_rows, vocab] float32 logits of the rows that sample, in `scheduled` order.
        bitmask: [num_rows, words] int32: bit j of word w allows token 32 * w + j. Rows of
            unconstrained sequences are all ones (-1) and are left alone; tokens past the
            bitmask's width are forbidden in the other rows.
    """
    rows = np.flatnonzero((bitmask != -1).any(axis=1))
    if rows.size == 0:
        return
    # E.g. word 0b101 -> bits [1, 0, 1, 0, ...]: tokens 0 and 2 allowed.
    words = bitmask[rows].astype("<i4", copy=False)  # little-endian: bytes in token order
    allowed = np.unpackbits(words.view(np.uint8), axis=1, bitorder="little")  # [C, 32 * words]
    width = min(logits.shape[1], allowed.shape[1])
    # NOTE: adding 0 / -inf is one vectorised pass, about twice as fast as masked_fill on CPU.
    penalty = torch.from_numpy(_PENALTY[allowed[:, :width]]).to(logits.device)  # [C, width]
    if rows.size == logits.shape[0]:
        sub = logits
    else:
        index = torch.from_numpy(rows).to(logits.device)
        sub = logits[index]  # [C, vocab] copy
    sub[:, :width] += penalty
    sub[:, width:] = float("-inf")
    if sub is not logits:
        logits[index] = sub
