"""The step contract between the scheduler (core) and the model runner (worker)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from pagedllm.core.stop_checker import min_tokens_stop_ids

if TYPE_CHECKING:
    from pagedllm.core import request
    from pagedllm.core.beam_search import Hypothesis
    from pagedllm.core.grammar_mask import PendingGrammarBitmask
    from pagedllm.sampling_params import SamplingParams


@dataclass
class ScheduledRequest:
    """One request's share of a step: a run of consecutive tokens to compute."""

    # The request's id.
    request_id: str
    # Index of the sequence within its request (0 .. best_of - 1).
    seq_index: int
    # "<request_id>#<seq_index>": the key of the sequence's block table and sampled token.
    seq_id: str
    # Tokens to feed this step: all_token_ids[start_position : start_position + len(token_ids)].
    token_ids: list[int]
    # Position of token_ids[0] in the request; equals the number of tokens already cached.
    start_position: int
    # Physical block ids of the request, covering start_position + len(token_ids) tokens.
    block_table: list[int]
    # True when this chunk reaches the end of the known tokens, so a new token is sampled.
    sample: bool
    # The request's sampling settings.
    sampling_params: SamplingParams
    # Read-only views of the request's tokens, for penalties and seeded sampling. NOTE: live
    # (no copy): read them before update_from_output appends this step's token.
    prompt_token_ids: Sequence[int]
    output_token_ids: Sequence[int]
    # Token ids forbidden this step because min_tokens is not reached yet (EOS, stop ids).
    min_tokens_stop_ids: list[int]
    # Speculative decoding: the proposed tokens that end token_ids (each row from the last
    # known token on samples, and the runner accepts the proposals its samples confirm), and
    # min_tokens_stop_ids of the row after each proposal. Empty without speculation.
    spec_token_ids: list[int] = field(default_factory=list)
    spec_min_tokens_stop_ids: list[list[int]] = field(default_factory=list)

    @classmethod
    def from_sequence(
        cls, seq: request.Sequence, num_new: int, block_table: list[int],
        spec_token_ids: Sequence[int] = (),
    ) -> ScheduledRequest:
        """The next `num_new` tokens of `seq`, from its first token not in the cache, then
        `spec_token_ids` (proposals after its last token) to verify."""
        start = seq.num_computed_tokens
        return cls(
            request_id=seq.request.request_id,
            seq_index=seq.index,
            seq_id=seq.seq_id,
            token_ids=[*seq.all_token_ids[start : start + num_new], *spec_token_ids],
            start_position=start,
            block_table=block_table,
            sample=start + num_new == seq.num_tokens,
            sampling_params=seq.request.sampling_params,
            prompt_token_ids=seq.request.prompt_token_ids,
            output_token_ids=seq.output_token_ids,
            min_tokens_stop_ids=min_tokens_stop_ids(seq.request, seq),
            spec_token_ids=list(spec_token_ids),
            spec_min_tokens_stop_ids=[min_tokens_stop_ids(seq.request, seq, j)
                                      for j in range(1, len(spec_token_ids) + 1)],
        )

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


@dataclass
class SchedulerOutput:
    """What the scheduler decided for one step."""

    # Requests to run this step, in batch order (running requests first, then newly admitted).
    scheduled: list[ScheduledRequest]
    # Sum of len(token_ids) over `scheduled`; never above max_num_batched_tokens.
    num_batched_tokens: int
    # Ids of requests preempted during this schedule (swapped out or freed for recompute).
    preempted_request_ids: list[str] = field(default_factory=list)
    # The worker runs these block moves before the forward pass, in this order:
    # (device block, host block) swap-outs, then (host block, device block) swap-ins, then
    # (source, destination) device copies for copy-on-write.
    blocks_to_swap_out: list[tuple[int, int]] = field(default_factory=list)
    blocks_to_swap_in: list[tuple[int, int]] = field(default_factory=list)
    blocks_to_copy: list[tuple[int, int]] = field(default_factory=list)
    # Structured outputs: the step's bitmask (`grammar_bitmask`), or the fill that makes it
    # (core/grammar_mask.PendingGrammarBitmask, which pickles as the array); None when no row
    # is constrained.
    _grammar_bitmask: np.ndarray | PendingGrammarBitmask | None = None

    @property
    def grammar_bitmask(self) -> np.ndarray | None:
        """[rows that sample, ceil(vocab / 32)] int32, row i for the i-th item of `scheduled`
        with sample=True. Bit j of word w allows token 32 * w + j; an unconstrained row is all
        ones (-1). None when no row is constrained. The model runner masks the logits with it
        before the sampler; reading it waits for its fill (started by the scheduler)."""
        bitmask = self._grammar_bitmask
        if bitmask is not None and not isinstance(bitmask, np.ndarray):
            bitmask = self._grammar_bitmask = bitmask.result()
        return bitmask

    @grammar_bitmask.setter
    def grammar_bitmask(self, bitmask: np.ndarray | PendingGrammarBitmask | None) -> None:
        self._grammar_bitmask = bitmask

    @property
    def is_empty(self) -> bool:
        """Nothing to run and no block to move."""
        return not (self.scheduled or self.blocks_to_swap_out or self.blocks_to_swap_in
                    or self.blocks_to_copy)


@dataclass
class SampledToken:
    """The token sampled for one request, with its log-probabilities."""

    # The sampled token id.
    token_id: int
    # Log-probability of token_id under the model's raw distribution; None when the request's
    # params do not need it (SamplingParams.needs_sampled_logprobs).
    logprob: float | None
    # 1-based rank of token_id in that distribution; None when logprobs were not asked for.
    rank: int | None
    # The k most likely (token_id, logprob) pairs, most likely first, when logprobs=k was asked.
    top_logprobs: list[tuple[int, float]] | None


@dataclass
class PromptLogprobsChunk:
    """Log-probabilities of a run of prompt tokens, from one step's prefill chunk."""

    # Index in the prompt of the first token below (>= 1: nothing predicts token 0).
    first_index: int
    # One SampledToken per prompt token from first_index on: the token itself, its logprob and
    # rank, and the top-k (k = SamplingParams.prompt_logprobs).
    tokens: list[SampledToken]


@dataclass
class ModelRunnerOutput:
    """What the model runner produced for one step."""

    # seq_id -> sampled token, for each scheduled sequence with sample=True.
    sampled: dict[str, SampledToken]
    # Speculative decoding: seq_id -> the tokens after `sampled[seq_id]` that verification
    # accepted, in order (the first len(...) proposals matched; the last entry is the
    # correction or bonus token). Absent for a sequence with no proposal accepted.
    spec_accepted: dict[str, list[SampledToken]] = field(default_factory=dict)
    # request_id -> the prompt tokens' logprobs that this step's chunk of sequence 0 computed,
    # for requests with SamplingParams.prompt_logprobs.
    prompt_logprobs: dict[str, PromptLogprobsChunk] = field(default_factory=dict)


@dataclass
class RequestUpdate:
    """What one step changed for one request, handed from the scheduler to the output side."""

    # The request's id.
    request_id: str
    # Index of the sequence within its request.
    seq_index: int
    # Tokens generated this step (empty for a prefill chunk that sampled nothing).
    new_tokens: list[SampledToken]
    # "stop", "length" or "abort" once the request is finished, else None.
    finish_reason: str | None
    # The stop token that ended the request, when finish_reason is "stop".
    stop_token_id: int | None = None
    # Beam search only, once finished: the best hypotheses, best first.
    beams: list[Hypothesis] | None = None
    # The prompt logprobs this step computed (SamplingParams.prompt_logprobs).
    prompt_logprobs: PromptLogprobsChunk | None = None
