"""Batched logits transforms: bias, penalties, token masks, top-k/top-p and min-p.

Each function takes `[num_rows, vocab_size]` float32 logits (or probs) plus one setting per row,
so a batch with mixed settings is handled in one pass. Rows whose setting is "off"
(bias 0, penalty 1/0, top_k 0, top_p 1, min_p 0) come out bit-identical, which is what keeps
seeded sampling independent of the batch a row shares.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

# Candidates per row for top-p without top-k: enough to hold the top-p mass of typical LLM
# distributions, while `topk` of this size is ~10x cheaper than a full sort on CPU.
TOP_P_CANDIDATES = 1024


def token_index_tensors(
    token_ids: Sequence[Sequence[int]], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Flattens per-row token lists into (row_indices, token_ids) int64 tensors.

    E.g. [[5, 7], [], [7]] -> rows [0, 0, 2], tokens [5, 7, 7].
    """
    lengths = [len(ids) for ids in token_ids]
    if sum(lengths) == 0:
        empty = torch.empty(0, dtype=torch.long, device=device)
        return empty, empty
    tokens = torch.cat([torch.as_tensor(ids, dtype=torch.long).reshape(-1) for ids in token_ids])
    rows = torch.repeat_interleave(torch.arange(len(token_ids)), torch.tensor(lengths))
    return rows.to(device), tokens.to(device)


def token_counts(
    token_ids: Sequence[Sequence[int]], vocab_size: int, device: torch.device
) -> torch.Tensor:
    """Returns [num_rows, vocab_size] int32 counts of each token id in each row's list."""
    rows, tokens = token_index_tensors(token_ids, device)
    counts = torch.zeros(len(token_ids), vocab_size, dtype=torch.int32, device=device)
    counts.index_put_((rows, tokens), torch.ones_like(tokens, dtype=torch.int32), accumulate=True)
    return counts


def apply_logit_bias(logits: torch.Tensor, logit_biases: Sequence[dict[int, float] | None]) -> None:
    """Adds each row's {token_id: bias} to its logits, in place."""
    triples = [
        (row, token_id, bias)
        for row, row_bias in enumerate(logit_biases)
        if row_bias
        for token_id, bias in row_bias.items()
    ]
    if not triples:
        return
    rows, tokens, biases = zip(*triples)
    device = logits.device
    logits.index_put_(
        (torch.tensor(rows, device=device), torch.tensor(tokens, device=device)),
        torch.tensor(biases, dtype=logits.dtype, device=device),
        accumulate=True,
    )


def apply_penalties(
    logits: torch.Tensor,
    prompt_mask: torch.Tensor,
    output_counts: torch.Tensor,
    presence_penalties: torch.Tensor,
    frequency_penalties: torch.Tensor,
    repetition_penalties: torch.Tensor,
) -> torch.Tensor:
    """Applies vLLM's repetition, frequency and presence penalties, in place.

    Args:
        logits: [num_rows, vocab_size] float.
        prompt_mask: [num_rows, vocab_size] bool, True where the token occurs in the prompt.
        output_counts: [num_rows, vocab_size] int, occurrences of the token in the output so far.
        presence_penalties, frequency_penalties, repetition_penalties: [num_rows] float.
    Returns:
        `logits`, for chaining.
    """
    output_mask = output_counts > 0
    # Repetition: seen tokens get their logit pushed towards "less likely" by the factor.
    rep = repetition_penalties.unsqueeze(1).expand_as(logits)
    rep = torch.where(prompt_mask | output_mask, rep, torch.ones_like(rep))
    logits.copy_(torch.where(logits > 0, logits / rep, logits * rep))
    # Frequency and presence look at the output only, as in OpenAI's definition.
    logits -= frequency_penalties.unsqueeze(1) * output_counts.to(logits.dtype)
    logits -= presence_penalties.unsqueeze(1) * output_mask.to(logits.dtype)
    return logits


def apply_token_mask(logits: torch.Tensor, forbidden_ids: Sequence[Sequence[int]]) -> None:
    """Sets logits[row, id] = -inf for every id in forbidden_ids[row], in place (min_tokens)."""
    rows, tokens = token_index_tensors(forbidden_ids, logits.device)
    if tokens.numel():
        logits.index_put_((rows, tokens), torch.tensor(float("-inf"), device=logits.device))


def apply_top_k_top_p(
    logits: torch.Tensor,
    top_k: Sequence[int] | None,
    top_p: Sequence[float] | None,
    max_candidates: int = TOP_P_CANDIDATES,
) -> torch.Tensor:
    """Masks (to -inf) the tokens outside each row's top-k and then top-p set.

    Order each row by logit, descending, ties towards the lower token id (like `torch.argmax`,
    so `top_k = 1` equals greedy). A row keeps the first `k` tokens (k = 0 keeps all); of those it
    keeps the shortest prefix whose probability, renormalised over the kept tokens, reaches `p`;
    the first token is always kept.

    NOTE: a full-vocabulary sort costs ~10x a `topk` of 1k on CPU, so rows are filtered among
    their `topk` candidates. Rows where that is not exact (a tie across the candidate boundary,
    or top-p mass beyond the candidates) retry with 8x the candidates, then with a full sort.

    Args:
        logits: [num_rows, vocab_size] float, already divided by temperature.
        top_k: per row, 0 (off) or >= 1; None if no row uses it.
        top_p: per row, in (0, 1] with 1 off; None if no row uses it.
        max_candidates: first candidate count for rows with top-p but no top-k.
    Returns:
        [num_rows, vocab_size] logits, new unless no row filters; kept tokens and unfiltered
        rows are bit-identical to the input.
    """
    num_rows, vocab_size = logits.shape
    ks = [k if 0 < k < vocab_size else 0 for k in top_k] if top_k is not None else [0] * num_rows
    ps = list(top_p) if top_p is not None else [1.0] * num_rows
    rows = [i for i in range(num_rows) if ks[i] > 0 or ps[i] < 1.0]
    if not rows:
        return logits
    device = logits.device
    num_filtered = len(rows)
    index = torch.tensor(rows, device=device)
    sub = logits if num_filtered == num_rows else logits[index]  # [n, V]
    k = torch.tensor([ks[i] for i in rows], device=device)
    p = torch.tensor([ps[i] for i in rows], dtype=logits.dtype, device=device)
    # Rows with top-p but no top-k normalise over the whole row; others over their top-k.
    full_lse = sub.logsumexp(dim=-1) if any(ks[i] == 0 for i in rows) else None

    def take(t: torch.Tensor, pending: torch.Tensor) -> torch.Tensor:
        # `pending` is an ascending subset of range(n): full size means all rows, no copy.
        return t if pending.numel() == num_filtered else t[pending]

    def take_lse(pending: torch.Tensor) -> torch.Tensor | None:
        return None if full_lse is None else take(full_lse, pending)

    filtered: torch.Tensor | None = None  # [n, V] result for the filtered rows
    pending = torch.arange(num_filtered, device=device)  # rows of `sub` not yet done exactly
    num_candidates = max(ks[i] if ks[i] > 0 else max_candidates for i in rows)
    while pending.numel() and num_candidates < vocab_size:
        attempt, exact = _filter_by_candidates(
            take(sub, pending), take(k, pending), take(p, pending), take_lse(pending),
            num_candidates,
        )
        if filtered is None:
            filtered = attempt
        else:
            filtered[pending[exact]] = attempt[exact]
        pending = pending[~exact]
        num_candidates *= 8  # flat rows: 8x the candidates still beats a full sort
    if pending.numel():
        attempt = _filter_by_sort(
            take(sub, pending), take(k, pending), take(p, pending), take_lse(pending)
        )
        if filtered is None:
            filtered = attempt
        else:
            filtered[pending] = attempt
    assert filtered is not None
    if num_filtered == num_rows:
        return filtered
    out = logits.clone()
    out[index] = filtered
    return out


def _filter_by_sort(
    logits: torch.Tensor, k: torch.Tensor, p: torch.Tensor, full_lse: torch.Tensor | None
) -> torch.Tensor:
    """Exact top-k/top-p over the whole vocabulary. logits [n, V]; k, p, full_lse [n]."""
    # NOTE: a stable descending sort keeps equal logits in id order, so position 0 is the argmax.
    sorted_logits, sorted_ids = torch.sort(logits, dim=-1, descending=True, stable=True)
    _mask_sorted(sorted_logits, k, p, full_lse)
    return torch.empty_like(logits).scatter_(1, sorted_ids, sorted_logits)


def _filter_by_candidates(
    logits: torch.Tensor,
    k: torch.Tensor,
    p: torch.Tensor,
    full_lse: torch.Tensor | None,
    num_candidates: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k/top-p among each row's `num_candidates` best tokens.

    Returns the filtered [n, V] logits and an [n] bool that is False for rows where the result
    may differ from `_filter_by_sort`; those rows must be redone.
    """
    values, ids = logits.topk(num_candidates + 1, dim=-1)  # [n, C + 1], descending
    # The top-C set is unambiguous only if no tie spans positions C - 1 and C.
    exact = values[:, num_candidates - 1] > values[:, num_candidates]
    values, ids = values[:, :-1], ids[:, :-1]
    # topk orders ties arbitrarily; re-sort the few candidates by (logit desc, id asc).
    ids, perm = ids.sort(dim=-1)
    values, perm = values.gather(1, perm).sort(dim=-1, descending=True, stable=True)
    ids = ids.gather(1, perm)
    mass = _mask_sorted(values, k, p, full_lse)
    # Rows with top-p but no top-k are exact only if the candidates hold at least p of the mass:
    # then every token after them has mass_before >= p and is dropped anyway.
    exact &= (k > 0) | (p >= 1.0) | (mass >= p)
    filtered = torch.full_like(logits, float("-inf")).scatter_(1, ids, values)
    return filtered, exact


def _mask_sorted(
    sorted_logits: torch.Tensor, k: torch.Tensor, p: torch.Tensor, full_lse: torch.Tensor | None
) -> torch.Tensor:
    """Masks, in place, a (prefix of a) row-sorted logits tensor by top-k then top-p.

    Args:
        sorted_logits: [n, W] logits sorted descending, ties by id; W may be < vocab_size.
        k: [n] int64, 0 for off; p: [n] float, 1 for off.
        full_lse: [n] logsumexp of each whole row, to normalise rows without top-k; None if
            every row has top-k.
    Returns:
        [n] probability mass of the W tokens after the top-k mask.
    """
    width = sorted_logits.shape[1]
    positions = torch.arange(width, device=sorted_logits.device).unsqueeze(0)  # [1, W]
    sorted_logits.masked_fill_((k > 0).unsqueeze(1) & (positions >= k.unsqueeze(1)), float("-inf"))
    lse = sorted_logits.logsumexp(dim=-1)
    if full_lse is not None:
        lse = torch.where(k > 0, lse, full_lse)
    probs = (sorted_logits - lse.unsqueeze(1)).exp()  # [n, W]
    cum = probs.cumsum(dim=-1)
    # Token j is kept iff the mass strictly before it is < p.
    # E.g. probs [0.5, 0.3, 0.2], p = 0.7: mass before = [0, 0.5, 0.8] -> keep 2 tokens.
    drop = (cum - probs >= p.unsqueeze(1)) & (p < 1.0).unsqueeze(1)
    drop[:, 0] = False
    sorted_logits.masked_fill_(drop, float("-inf"))
    return cum[:, -1]


def apply_min_p(probs: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Zeroes tokens whose probability is below min_p x the row's top probability, in place.

    Args:
        probs: [num_rows, vocab_size] float probabilities.
        min_p: [num_rows] float in [0, 1]; 0 is off.
    """
    threshold = min_p.unsqueeze(1) * probs.amax(dim=-1, keepdim=True)
    return probs.masked_fill_(probs < threshold, 0.0)
