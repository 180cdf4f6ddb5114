"""Log-probabilities under the raw model distribution (no bias, penalties or temperature):
each row's argmax and logsumexp (natively where the op is built), the sampled tokens' logprob,
rank and top-k, and the prompt tokens' (prompt logprobs)."""

from __future__ import annotations

import torch

from pagedllm.core.interface import SampledToken
from pagedllm.ops import native_ops
from pagedllm.sampling_params import SamplingParams


def argmax_logsumexp(
    logits: torch.Tensor, with_logsumexp: bool = True
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per row: the first index of the maximum and the logsumexp ([R] int64, [R] float32; None
    without `with_logsumexp`).

    The fused CPU op reads each row of a float32 [R, V] tensor twice (once without the
    logsumexp) instead of the five passes and temporaries of eager torch; elsewhere torch
    computes the same.
    """
    ops = native_ops(logits) if logits.dtype == torch.float32 and logits.dim() == 2 else None
    if ops is not None and logits.shape[1] > 0:
        argmax, lse = ops.argmax_logsumexp(logits, with_logsumexp)
        return argmax, lse if with_logsumexp else None
    return logits.argmax(dim=-1), torch.logsumexp(logits, dim=-1) if with_logsumexp else None


def sampled_logprobs(
    logits: torch.Tensor,
    token_ids: torch.Tensor,
    params: list[SamplingParams],
) -> tuple[list[float | None], list[int | None],
           list[list[tuple[int, float]] | None]]:
    """Log-probabilities of the chosen tokens under the raw logits, for the rows that need
    them (SamplingParams.needs_sampled_logprobs; None for the others): per row the chosen
    token's logprob, its rank and the top `params.logprobs` (SamplerOutput's last three
    fields).

    A full log_softmax (with ranks and top-k) runs only over the rows that asked for
    logprobs; best_of rows need just the chosen token's logprob (for cumulative_logprob),
    which their logsumexp yields without a [R, V] temporary.
    """
    num_rows = len(params)
    rows = [i for i, p in enumerate(params) if p.logprobs is not None]
    chosen: list[float | None] = [None] * num_rows
    lse_rows = [i for i, p in enumerate(params)
                if p.logprobs is None and p.needs_sampled_logprobs]
    if lse_rows:
        index = torch.tensor(lse_rows, device=logits.device)
        sub = logits[index]
        chosen_logits = sub.gather(1, token_ids[index].unsqueeze(1)).squeeze(1)
        for row, value in zip(lse_rows, (chosen_logits - argmax_logsumexp(sub)[1]).tolist()):
            chosen[row] = value
    ranks: list[int | None] = [None] * num_rows
    top_logprobs: list[list[tuple[int, float]] | None] = [None] * num_rows
    if rows:
        index = torch.tensor(rows, device=logits.device)
        raw = torch.log_softmax(logits[index], dim=-1)  # [L, V]
        row_chosen = raw.gather(1, token_ids[index].unsqueeze(1))  # [L, 1]
        # Rank = 1 + number of tokens strictly more likely (ties share the better rank).
        row_ranks = ((raw > row_chosen).sum(dim=-1) + 1).tolist()
        max_k = min(max(params[i].logprobs for i in rows), raw.shape[1])
        top_values = top_ids = None
        if max_k > 0:
            top_values, top_ids = raw.topk(max_k, dim=-1)  # [L, max_k], descending
            top_values, top_ids = top_values.tolist(), top_ids.tolist()
        for j, row in enumerate(rows):
            chosen[row] = row_chosen[j, 0].item()
            ranks[row] = row_ranks[j]
            k = params[row].logprobs
            top_logprobs[row] = (
                [] if k == 0 or top_ids is None
                else list(zip(top_ids[j][:k], top_values[j][:k]))
            )
    return chosen, ranks, top_logprobs


def prompt_logprobs(logits: torch.Tensor, token_ids: torch.Tensor, k: int) -> list[SampledToken]:
    """The raw log-probability and rank of token_ids[i] under logits[i], with the top `k`.

    Args:
        logits: [P, vocab] float32, one row per prompt position that predicts a prompt token.
        token_ids: [P] the prompt tokens those rows predict.
        k: how many top alternatives each entry lists (0: none).
    """
    raw = torch.log_softmax(logits.float(), dim=-1)
    chosen = raw.gather(1, token_ids.unsqueeze(1))  # [P, 1]
    ranks = ((raw > chosen).sum(dim=-1) + 1).tolist()
    top: list[list[tuple[int, float]]] = [[] for _ in range(raw.shape[0])]
    k = min(k, raw.shape[1])
    if k > 0:
        values, ids = raw.topk(k, dim=-1)
        top = [list(zip(i, v)) for i, v in zip(ids.tolist(), values.tolist())]
    return [SampledToken(token_id=t, logprob=c, rank=r, top_logprobs=tl)
            for t, c, r, tl in zip(token_ids.tolist(), chosen.squeeze(1).tolist(), ranks, top)]
