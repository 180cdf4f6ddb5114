"""CheckpointTensor (models/checkpoint_tensor.py): a view of a safetensors tensor that reads
only the part it is narrowed to, as each tensor-parallel rank's weight loaders need; every view
equals the same view of the whole tensor, and the reads count only the part."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from pagedllm.models.checkpoint_tensor import CheckpointTensor


@pytest.fixture
def stored(tmp_path):
    tensors = {"w": torch.randn(6, 10, dtype=torch.bfloat16), "b": torch.randn(6),
               "s": torch.tensor(3.0)}
    path = tmp_path / "model.safetensors"
    save_file(tensors, path)
    reads = Counter()
    with safe_open(path, framework="pt") as f:
        yield tensors, {name: CheckpointTensor(f, name, reads) for name in tensors}, reads


def test_views_read_only_their_part(stored):
    whole, lazy, reads = stored
    w, lw = whole["w"], lazy["w"]
    assert lw.shape == w.shape and lw.dtype == torch.bfloat16 and lw.dim() == 2
    assert not reads  # nothing read until used
    # Row shard (column-parallel), column shard (row-parallel), rows of a split (q/k/v).
    dst = torch.empty(3, 10, dtype=torch.bfloat16)
    dst.copy_(lw.narrow(0, 3, 3))
    assert torch.equal(dst, w[3:6]) and reads["w"] == 30
    assert torch.equal(torch.clone(lw.narrow(1, 5, 5)), w[:, 5:])
    assert reads["w"] == 30 + 30
    parts = lw.split([1, 2, 3], dim=0)
    assert [tuple(p.shape) for p in parts] == [(1, 10), (2, 10), (3, 10)]
    assert torch.equal(parts[2].materialize(), w[3:])
    assert reads["w"] == 60 + 30
    # GPT-2's Conv1D is stored [in, out]: a shard of the transpose reads stored columns.
    assert lw.t().shape == (10, 6)
    assert torch.equal(lw.t().narrow(0, 2, 4).narrow(1, 1, 2).materialize(),
                       w.t()[2:6, 1:3])
    assert reads["w"] == 90 + 8
    # Vocabulary rows by slicing; other indexing reads the view, then indexes it.
    assert torch.equal(lw[1:4].materialize(), w[1:4]) and reads["w"] == 98 + 30
    assert torch.equal(lw[1:4, 2], w[1:4, 2])


def test_any_other_use_reads_the_view(stored):
    whole, lazy, reads = stored
    assert torch.equal(lazy["b"].narrow(0, 2, 2).float(), whole["b"][2:4])
    assert reads["b"] == 2
    assert torch.equal(torch.cat([lazy["b"], whole["b"]]), torch.cat([whole["b"]] * 2))
    assert torch.equal(torch.mul(lazy["s"], 2), whole["s"] * 2)  # a 0-d tensor
    assert lazy["s"].item() == whole["s"].item()
    with pytest.raises(IndexError):
        lazy["w"].narrow(0, 4, 3)
