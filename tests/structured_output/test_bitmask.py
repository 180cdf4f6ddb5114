"""apply_grammar_bitmask: bit j of word w allows token 32 * w + j; unconstrained rows (all
ones) are left alone; tokens past the bitmask's width are forbidden."""

from __future__ import annotations

import numpy as np
import torch

from pagedllm.structured_output.bitmask import apply_grammar_bitmask


def test_forbidden_tokens_become_minus_inf_and_free_rows_stay():
    logits = torch.arange(3 * 70, dtype=torch.float32).reshape(3, 70)
    expected = logits.clone()
    bitmask = np.full((3, 2), -1, dtype=np.int32)  # 64 bits: tokens 64..69 are past it
    bitmask[1] = [0b101, np.uint32(1 << 31).view(np.int32)]  # tokens 0, 2 and 63
    apply_grammar_bitmask(logits, bitmask)
    assert torch.equal(logits[0], expected[0]) and torch.equal(logits[2], expected[2])
    assert torch.isfinite(logits[1]).nonzero().flatten().tolist() == [0, 2, 63]
    assert torch.equal(logits[1, [0, 2, 63]], expected[1, [0, 2, 63]])


def test_every_row_constrained_against_a_reference():
    rng = np.random.default_rng(0)
    logits = torch.randn(4, 100)
    bitmask = rng.integers(-2**31, 2**31, size=(4, 4), dtype=np.int64).astype(np.int32)
    bits = np.unpackbits(bitmask.view(np.uint8), axis=1, bitorder="little")[:, :100]
    expected = logits.masked_fill(torch.from_numpy(bits == 0), float("-inf"))
    apply_grammar_bitmask(logits, bitmask)
    assert torch.equal(logits, expected)
