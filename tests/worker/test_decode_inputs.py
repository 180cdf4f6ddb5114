"""The model runner's decode fast path (one token per sequence) builds the same inputs as the
general path, and a decode step's LM-head rows are the same rows."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from pagedllm.attention.metadata import build_attention_metadata, build_decode_metadata
from pagedllm.worker import model_runner
from pagedllm.worker.model_runner import _take_rows, prepare_inputs

CPU = torch.device("cpu")


def _general(token_ids, starts, tables, block_size, monkeypatch):
    with monkeypatch.context() as m:
        m.setattr(model_runner, "DECODE_FAST_PATH_MAX_SEQS", 0)
        return prepare_inputs(token_ids, starts, tables, block_size, CPU)


@pytest.mark.parametrize("seed", range(4))
def test_decode_fast_path_equals_general_path(seed: int, monkeypatch) -> None:
    rng = random.Random(seed)
    for _ in range(50):
        n = rng.randint(1, model_runner.DECODE_FAST_PATH_MAX_SEQS)
        block_size = rng.choice([1, 4, 16])
        token_ids = [[rng.randint(0, 1000)] for _ in range(n)]
        starts = [rng.randint(0, 300) for _ in range(n)]
        tables = []
        for start in starts:
            need = start // block_size + 1
            table = [rng.randint(0, 500) for _ in range(need + rng.randint(0, 3))]
            for j in range(rng.randint(0, need - 1) if rng.random() < 0.3 else 0):
                table[j] = -1  # freed out of a sliding window (NULL_BLOCK)
            tables.append(table)
        fast = prepare_inputs(token_ids, starts, tables, block_size, CPU)
        general = _general(token_ids, starts, tables, block_size, monkeypatch)
        for a, b in zip(fast[:2], general[:2]):
            assert a.dtype == b.dtype and torch.equal(a, b)
        assert np.array_equal(fast[3], general[3])
        for name in fast[2].__dataclass_fields__:
            a, b = getattr(fast[2], name), getattr(general[2], name)
            if isinstance(a, torch.Tensor):
                assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), name
                assert a.is_contiguous(), name
            else:
                assert a == b, name


def test_decode_metadata_rejects_what_the_general_builder_rejects() -> None:
    for seq_lens, tables in (([5], [[3]]), ([0], [[3]])):
        with pytest.raises(ValueError) as general:
            build_attention_metadata([1], seq_lens, tables, block_size=4)
        with pytest.raises(ValueError) as fast:
            build_decode_metadata(seq_lens, tables, block_size=4)
        assert str(fast.value) == str(general.value)
    with pytest.raises(ValueError, match="one entry per sequence"):
        build_decode_metadata([5, 6], [[3, 4]], block_size=4)


def test_take_rows_views_consecutive_rows_and_gathers_the_rest() -> None:
    hidden = torch.arange(12.0).view(6, 2)
    assert _take_rows(hidden, [0, 1, 2, 3, 4, 5]) is hidden
    view = _take_rows(hidden, [2, 3, 4])
    assert view.data_ptr() == hidden[2].data_ptr() and torch.equal(view, hidden[2:5])
    assert torch.equal(_take_rows(hidden, [0, 2, 5]), hidden[[0, 2, 5]])
    transposed = torch.arange(12.0).view(2, 6).t()
    assert torch.equal(_take_rows(transposed, [1, 2]), transposed[[1, 2]])
