"""Verification of proposals by the target model's own sampler: exact for greedy, seeded and
random sampling alike.

The row after proposals d_1..d_j is sampled as plain decoding would sample that position, with
d_1..d_j as the tokens generated so far (penalties, min_tokens and the seeded noise of that
position included). Proposal d_{j+1} is accepted while the row's sample equals it; the first
row whose sample differs gives the correction, and when every proposal holds, the last row
gives a bonus token.

Why this is the rejection sampler for a one-hot proposal distribution q = [x]: the sample
equals x with probability p(x) (accept with min(1, p(x) / q(x)) = p(x)), and given that it
differs it is distributed as p with x removed, renormalised, which is max(p - q, 0)
normalised. A greedy row accepts while the proposal is the argmax, so greedy output is
identical to decoding without speculation; a seeded row draws the same noise for the same
position, so its output is identical too.
"""

from __future__ import annotations

from collections.abc import Sequence

from pagedllm.core.interface import ScheduledRequest
from pagedllm.sample.sampler import SamplingBatch


def sampling_rows(items: list[ScheduledRequest]) -> tuple[SamplingBatch, list[int]]:
    """The sampler rows of the items that sample: 1 + len(spec_token_ids) rows per item, row j
    with the first j proposals as generated tokens. Returns the batch and each item's row count.
    """
    params, prompts, outputs, stop_ids, indices, counts = [], [], [], [], [], []
    for s in items:
        spec = s.spec_token_ids
        counts.append(1 + len(spec))
        for j in range(1 + len(spec)):
            params.append(s.sampling_params)
            prompts.append(s.prompt_token_ids)
            outputs.append(s.output_token_ids if j == 0 else [*s.output_token_ids, *spec[:j]])
            stop_ids.append(s.min_tokens_stop_ids if j == 0
                            else s.spec_min_tokens_stop_ids[j - 1])
            indices.append(s.seq_index)
    return SamplingBatch(params=params, prompt_token_ids=prompts, output_token_ids=outputs,
                         min_tokens_stop_ids=stop_ids, sample_indices=indices), counts


def num_accepted(proposals: Sequence[int], samples: Sequence[int]) -> int:
    """How many leading proposals the rows' samples confirm (samples has one more entry)."""
    m = 0
    while m < len(proposals) and samples[m] == proposals[m]:
        m += 1
    return m
