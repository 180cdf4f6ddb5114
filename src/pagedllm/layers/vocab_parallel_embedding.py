"""The token embedding and the LM head, split over the ranks by vocabulary (vLLM's names).

Rank r holds rows [r * n, (r + 1) * n) of the [vocab, hidden] table, n = ceil(vocab / tp); the
last rank's rows past the vocabulary are zero. The embedding looks up the ids in its range
(zeros elsewhere) and all-reduces; the LM head computes its logits' columns and gathers them
to rank 0, the rank that samples. At one rank both are nn.Embedding's lookup and the dense
packed LM head, unchanged.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from pagedllm.distributed import (
    get_tp_group,
    tensor_model_parallel_all_reduce,
    tensor_model_parallel_gather,
)
from pagedllm.layers.linear import KeepsParamAttrs, LinearBase, check_weight_shape
from pagedllm.layers.quantization.base import QuantizationConfig, set_weight_attrs


class _VocabShard:
    """This rank's rows of a [vocab, hidden] table."""

    def __init__(self, num_embeddings: int) -> None:
        tp = get_tp_group()
        self.num_embeddings = num_embeddings
        self.num_embeddings_per_partition = math.ceil(num_embeddings / tp.world_size)
        self.vocab_start_index = min(tp.rank * self.num_embeddings_per_partition,
                                     num_embeddings)
        self.vocab_end_index = min(self.vocab_start_index + self.num_embeddings_per_partition,
                                   num_embeddings)

    def load(self, param: nn.Parameter, loaded_weight: torch.Tensor) -> None:
        """Copies this rank's rows of the whole [vocab, hidden] table (or [vocab] bias), read
        alone where the loader passes a checkpoint view; zeros the padding."""
        check_weight_shape(loaded_weight, [self.num_embeddings, *param.shape[1:]])
        rows = self.vocab_end_index - self.vocab_start_index
        param.data[:rows].copy_(loaded_weight.narrow(0, self.vocab_start_index, rows))
        param.data[rows:].zero_()


class VocabParallelEmbedding(KeepsParamAttrs):
    """nn.Embedding over this rank's vocabulary rows, all-reduced over the ranks."""

    def __init__(self, num_embeddings: int, embedding_dim: int,
                 params_dtype: torch.dtype | None = None,
                 quant_config: QuantizationConfig | None = None, prefix: str = "") -> None:
        super().__init__()
        self.tp_size = get_tp_group().world_size
        self.shard = _VocabShard(num_embeddings)
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.prefix = prefix
        weight = nn.Parameter(torch.empty(self.shard.num_embeddings_per_partition, embedding_dim,
                                          dtype=params_dtype or torch.get_default_dtype()),
                              requires_grad=False)
        set_weight_attrs(weight, {"weight_loader": self.weight_loader, "output_dim": 0})
        self.weight = weight
        if weight.device.type != "meta":
            with torch.no_grad():
                nn.init.normal_(self.weight)  # nn.Embedding's init, for tests

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor,
                      shard_id: int | None = None) -> None:
        self.shard.load(param, loaded_weight)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return F.embedding(input_ids, self.weight)
        start, end = self.shard.vocab_start_index, self.shard.vocab_end_index
        mine = (input_ids >= start) & (input_ids < end)
        out = F.embedding((input_ids - start) * mine, self.weight)
        out.masked_fill_(~mine.unsqueeze(-1), 0)
        return tensor_model_parallel_all_reduce(out)

    def extra_repr(self) -> str:
        return (f"num_embeddings={self.num_embeddings}, embedding_dim={self.embedding_dim}, "
                f"rows={self.shard.vocab_start_index}:{self.shard.vocab_end_index}")


def gather_logits(local: torch.Tensor, vocab_size: int) -> torch.Tensor | None:
    """This rank's logit columns [rows, vocab / tp] -> all of them [rows, vocab] on rank 0;
    None on the other ranks (which do not sample)."""
    if get_tp_group().world_size == 1:
        return local
    full = tensor_model_parallel_gather(local, dst=0, dim=-1)
    return None if full is None else full[:, :vocab_size]


class ParallelLMHead(LinearBase):
    """The untied LM head: a column-parallel [vocab, hidden] projection whose logits are
    gathered to rank 0 (`compute_logits`), padded per rank as VocabParallelEmbedding is."""

    def __init__(self, num_embeddings: int, embedding_dim: int, bias: bool = False,
                 params_dtype: torch.dtype | None = None,
                 quant_config: QuantizationConfig | None = None, prefix: str = "") -> None:
        shard = _VocabShard(num_embeddings)
        tp = get_tp_group()
        super().__init__(embedding_dim, num_embeddings, bias, params_dtype, quant_config, prefix,
                         output_partition_sizes=[shard.num_embeddings_per_partition],
                         output_shard_ranks=[tp.rank])
        self.shard = shard
        self.num_embeddings = num_embeddings

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor,
                      shard_id: int | None = None) -> None:
        self.shard.load(param, loaded_weight)  # the weight's rows, or the bias's entries

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """hidden [rows, hidden] -> fp32 logits [rows, vocab] on rank 0 (None elsewhere)."""
        if self.packed is not None:  # fp32 written by the kernel, no conversion pass
            local = self.packed(hidden, out_dtype=torch.float32)
        else:
            local = self.linear_method.apply(self, hidden, self.rank_bias()).float()
        return gather_logits(local, self.num_embeddings)
