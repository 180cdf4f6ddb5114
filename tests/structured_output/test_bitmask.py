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


def reference_apply(logits: torch.Tensor, bitmask: np.ndarray) -> torch.Tensor:
    """The definition, one bit at a time: a constrained row keeps the logits of its allowed
    tokens and gets -inf elsewhere (past the bitmask's width too); an all-ones row is left."""
    out = logits.clone()
    width = 32 * bitmask.shape[1]
    for row in range(bitmask.shape[0]):
        if (bitmask[row] == -1).all():
            continue
        for token in range(logits.shape[1]):
            word, bit = divmod(token, 32)
            if token >= width or not (int(bitmask[row, word]) >> bit) & 1:
                out[row, token] = float("-inf")
    return out


def test_random_masks_equal_the_definition():
    """Mixed, all-allowed, all-forbidden-but-one and all-forbidden rows; a vocabulary wider and
    narrower than the bitmask; every row or some rows constrained."""
    rng = np.random.default_rng(1)
    for vocab, words in ((100, 4), (70, 2), (96, 3)):
        bitmask = rng.integers(-2**31, 2**31, size=(6, words), dtype=np.int64).astype(np.int32)
        bitmask[1] = -1  # unconstrained
        bitmask[2] = 0
        bitmask[2, words - 1] = np.uint32(1 << 31).view(np.int32)  # the last bit alone
        bitmask[3] = 0
        bitmask[3, 0] = 1  # token 0 alone
        bitmask[4] = 0  # nothing (a grammar never asks this; the definition still holds)
        for rows in (slice(None), [0, 2, 3], [1, 5]):
            logits = torch.randn(6, vocab)
            logits[0, 3] = -0.0  # a kept logit keeps its bits
            sub_mask = np.full_like(bitmask, -1)
            sub_mask[rows] = bitmask[rows]
            expected = reference_apply(logits, sub_mask)
            apply_grammar_bitmask(logits, sub_mask)
            assert torch.equal(logits, expected), (vocab, words, rows)
            assert torch.equal(logits.view(torch.int32), expected.view(torch.int32))


def test_kept_logits_keep_their_bits_at_full_size():
    """The benchmark's vocabulary with 70 rows, 68 of them constrained (rows are masked in
    chunks: 68 is not a multiple of one)."""
    rng = np.random.default_rng(2)
    logits = torch.randn(70, 49152)
    bitmask = rng.integers(-2**31, 2**31, size=(70, 1536), dtype=np.int64).astype(np.int32)
    bitmask[0] = 0
    bitmask[0, 7] = 1 << 3  # token 227 alone
    bitmask[[5, 40]] = -1  # unconstrained
    bits = np.unpackbits(bitmask.view(np.uint8), axis=1, bitorder="little")
    expected = logits.masked_fill(torch.from_numpy(bits == 0), float("-inf"))
    apply_grammar_bitmask(logits, bitmask)
    assert torch.equal(logits.view(torch.int32), expected.view(torch.int32))
    assert torch.isfinite(logits[0]).nonzero().flatten().tolist() == [227]
