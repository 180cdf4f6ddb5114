"""Rejection sampling for proposals drawn from a draft distribution q that is not one-hot.

Row j of a verified item is the target's distribution p_j after the first j proposals (the
sampler's own logits processing: bias, penalties, min_tokens mask, temperature, top-k/top-p,
min-p). Proposal d_{j+1} was drawn from the draft's q_j, processed the same way. It is accepted
with probability min(1, p_j(d) / q_j(d)); at the first rejection the token is drawn from
max(p_j - q_j, 0) normalised instead, and when every proposal holds, a bonus token is drawn from
the last row's p. Each emitted token is then distributed exactly as p (Leviathan et al., 2023;
Chen et al., 2023), whatever q is.

Noise: a seeded row draws its acceptance test and its draws from generators seeded by (seed,
sample, position, stream), so the same seed gives the same output again; the others share the
caller's generator. Greedy rows never come here: their draft proposes its argmax (q one-hot),
which spec_decode/verify.py checks exactly.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from pagedllm.sample.sampler import Sampler, SamplingBatch, sample_seed, seed_for_position
from pagedllm.sampling_params import SamplingParams

# Noise streams of one (seed, sample, position), apart from the sampler's own (stream 0).
DRAFT_STREAM = 1
ACCEPT_STREAM = 2


def sampling_probs(sampler: Sampler, logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """[R, V] float32: the distribution each (non-greedy) row samples from, as Sampler does it
    (process_logits, then Sampler.sampling_probs); `logits` is left as it was."""
    x = sampler.process_logits(logits.float(), batch)
    if x is logits:
        x = x.clone()
    return sampler.sampling_probs(x, batch.params)


def row_generator(params: SamplingParams, sample_index: int, position: int, stream: int,
                  device: torch.device, shared: torch.Generator) -> torch.Generator:
    """The generator of one row's draw: seeded by (seed, sample, position, stream) when the
    request has a seed, else the shared one."""
    if params.seed is None:
        return shared
    gen = torch.Generator(device=device)
    base = seed_for_position(sample_seed(params.seed, sample_index), position)
    gen.manual_seed(seed_for_position(base, stream))
    return gen


def race(probs: torch.Tensor, gen: torch.Generator) -> int:
    """One draw from the unnormalised weights `probs` [V]: argmax(probs / E), E ~ Exp(1)."""
    u = torch.empty_like(probs).uniform_(generator=gen)
    return int(probs.div(u.log_().neg_()).argmax())


def rejection_sample(p: torch.Tensor, q: torch.Tensor, proposals: Sequence[int],
                     params: SamplingParams, sample_index: int, num_output_tokens: int,
                     shared: torch.Generator) -> list[int]:
    """The tokens one item emits: the accepted proposals, then the correction or bonus token.

    Args:
        p: [k + 1, V] the target's distributions (sampling_probs of the item's rows).
        q: [k, V] the draft's distributions its proposals were drawn from.
        proposals: the k proposed tokens.
        params, sample_index: the item's settings and sample (for seeded noise).
        num_output_tokens: tokens generated before this step (row j is position this + j).
        shared: the generator of unseeded rows.
    """
    k = len(proposals)
    device = p.device
    index = torch.tensor(list(proposals), device=device)
    rows = torch.arange(k, device=device)
    p_d, q_d = p[rows, index], q[rows, index]
    if params.seed is None:
        u = torch.empty(k, device=device).uniform_(generator=shared)
    else:
        u = torch.stack([
            torch.empty((), device=device).uniform_(generator=row_generator(
                params, sample_index, num_output_tokens + j, ACCEPT_STREAM, device, shared))
            for j in range(k)])
    # Accept with probability min(1, p/q): u * q < p (q(d) > 0, since d was drawn from q).
    rejected = torch.nonzero(u * q_d >= p_d).flatten().tolist()
    m = rejected[0] if rejected else k
    weights = p[m]
    if m < k:
        residual = (p[m] - q[m]).clamp_(min=0)
        # NOTE: p == q up to rounding leaves nothing: then p itself (the residual's limit).
        if float(residual.sum()) > 0:
            weights = residual
    gen = row_generator(params, sample_index, num_output_tokens + m, 0, device, shared)
    return [*proposals[:m], race(weights, gen)]
