"""int8's tied LM head (PAGEDLLM_INT8_LM_HEAD, opt-in): an int8 copy of the embedding on the
W8A8 GEMM (untie_lm_head) whose logits near each row's largest are recomputed exactly from the
dense table the lookups keep (rescore_logits). Int8Config (int8.py) reads the setting and
unties the head before the layers are quantized; Int8LinearMethod's logits path rescores.

NOTE: on the head W8A8 alone costs too much agreement. SmolLM2's tied head on its own (the bf16
model's final hidden states, 2,048 positions) picks the dense head's top token on 98.3% of
positions in groups of 16, 97.7% in 32, 97.1% in 64 (smoothing it: no gain), and in the engine
(24,576 tokens) the model with a W8A8 head agrees with bf16 on 96.54% / 96.38% / 95.65%
(smoothing the head through the final norm, tried and dropped: groups of 64 96.10%, 32 and 16
unchanged), short of 97%: its 8-bit activations flip near-tied logits.
With LM_HEAD_ENV=32 a tied head scans the vocabulary on the W8A8 GEMM (an int8 copy of the
embedding, groups of 32) and recomputes exactly the logits near each row's largest
(rescore_logits, natively: ops/csrc/quant_int8.cpp) from the dense table the lookups keep:
97.15% top-1, +0.23% perplexity (the dense head: 97.15%, +0.20%; 24,576 tokens, the native
rescoring). Per call at 64 rows (benchmarks/int8_head.py, SmolLM2's first decode states, 71
logits per row within 4 nats; 2.1 on later steps): one thread's CPU, dense bf16 10.2 ms, W8A8
7.1, with the rescoring 8.4 (in torch the rescoring alone cost ~8.6); wall time on two
threads, dense 5.5-6.0 ms, W8A8 3.7-4.2, with the rescoring 5.5-6.0 (the rescoring's reads of
the logits and of scattered table rows do not halve on two threads). End to end it did not
show a gain on two threads (the fixed workload, `bench throughput`, two alternating rounds at
load ~1.6: 957 / 847 out tok/s against 1087 / 1006 with the dense head), though on one
thread (CPU seconds, same process, 4 alternating rounds, loaded) it took 9.63 / 10.02 s best /
median against 10.58 / 11.06: so the head stays dense by default until a quiet run settles it.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from pagedllm.layers.quantization.base import LinearMethodBase
from pagedllm.ops import cpu_ops

# A tied LM head (PAGEDLLM_INT8_LM_HEAD overrides it): "dense" (the model's dtype), or W8A8
# in groups of this many inputs on an int8 copy of the embedding (untie_lm_head), whose
# logits within RESCORE_MARGIN of each row's largest are then recomputed exactly from the
# dense table the lookups keep (rescore_logits; see NOTE: the quality holds, but the rescoring
# in torch costs more than the GEMM saves, so dense is the default). An untied head stays
# dense (its dense weight is not kept to rescore from).
LM_HEAD = "dense"
LM_HEAD_ENV = "PAGEDLLM_INT8_LM_HEAD"
# Nats below a row's largest W8A8 logit within which logits are recomputed exactly: SmolLM2's
# head in groups of 32 is off by at most 0.61 (2,048 positions of the shipped text, all 49,152
# logits), so a row's top token is the dense head's while the error stays under half of it;
# 2.3 logits per row lie within 1 nat of the largest, 5.4 within 2.
RESCORE_MARGIN = 4.0


def lm_head_group_size() -> int | None:
    """The tied head's group size from LM_HEAD_ENV (else LM_HEAD), None for dense; ValueError
    naming the allowed values."""
    return _lm_head_group(os.environ.get(LM_HEAD_ENV) or LM_HEAD)


def untie_lm_head(model: nn.Module, linear_method: LinearMethodBase) -> None:
    """Where the model's LM head is tied to the token embedding (lm_head None) and the kernels
    are built: a ParallelLMHead of its own on `linear_method` (int8's, logits=True) holding a
    copy of this rank's embedding rows, which pack_weights quantizes (and frees), and
    rescoring its top logits from the embedding's dense table (exact_rows), which the lookups
    keep. In place of the tied head's packed dense copy: the int8 bytes and scales (SmolLM2,
    groups of 32: 28.3 + 3.5 MB against the bf16 copy's 56.6 MB)."""
    if (cpu_ops() is None or getattr(model, "lm_head", True) is not None
            or not hasattr(model, "get_input_embeddings")):
        return
    from pagedllm.layers.vocab_parallel_embedding import ParallelLMHead

    embedding = model.get_input_embeddings().weight
    head = ParallelLMHead(model.config.vocab_size, model.config.hidden_size,
                          params_dtype=embedding.dtype, prefix="lm_head")
    head.linear_method = linear_method
    head.int8_weight = head.int8_scales = head.int8_bias = None
    head.weight.data.copy_(embedding.detach())
    head.exact_rows = embedding
    model.lm_head = head


def rescore_logits(logits: torch.Tensor, hidden: torch.Tensor, rows: torch.Tensor,
                   margin: float = RESCORE_MARGIN) -> None:
    """logits [M, V] fp32 (the W8A8 head's on hidden [M, K]): those within `margin` of their
    row's largest recomputed in place as hidden's row times `rows` [V, K] (the dense table),
    the products in fp32 (exact for bf16 inputs) summed in fp64: each a function of its row
    and token alone, so a row's logits are the same alone as in any batch. Under tensor
    parallelism each rank's columns against its own largest (a superset of the tokens within
    `margin` of the row's largest over every rank)."""
    ops = cpu_ops()
    if ops is not None and rows.is_contiguous() and hidden.stride(-1) == 1:
        # Natively (ops/csrc/quant_int8.cpp): each row's largest, then the dot products of
        # the few logits within the margin, the products in fp32 summed in fp64 lanes.
        ops.int8_rescore_logits(logits, hidden, rows, margin)
        return
    top = logits.amax(-1, keepdim=True)
    r, t = torch.nonzero(logits >= top - margin, as_tuple=True)
    exact = (hidden[r].float() * rows[t].float()).sum(-1, dtype=torch.float64)
    logits[r, t] = exact.float()


def _lm_head_group(value: str) -> int | None:
    """LM_HEAD_ENV's value -> the head's group size, None for dense."""
    value = value.strip().lower()
    if value == "dense":
        return None
    try:
        group = int(value)
    except ValueError:
        group = 0
    if group <= 0 or group % 16 or 64 % group and group % 64:
        raise ValueError(f"{LM_HEAD_ENV} must be dense or a group size (a multiple of 16 "
                         f"dividing 64, or of 64), got {value!r}")
    return group
