"""Request (a sequence group) and its Sequences: the scheduler's per-request state.

Token lists change only through `Sequence.append_token`; everyone else reads views.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence as SequenceABC
from typing import TYPE_CHECKING

from pagedllm.core.beam_search import BeamSearchParams, BeamState
from pagedllm.core.block_hash import extend_block_hashes

if TYPE_CHECKING:
    from pagedllm.sampling_params import SamplingParams


class RequestStatus(enum.IntEnum):
    """Lifecycle of a request or sequence; every finished state sorts after the live ones."""

    WAITING = enum.auto()
    RUNNING = enum.auto()
    SWAPPED = enum.auto()
    FINISHED_STOPPED = enum.auto()
    FINISHED_LENGTH = enum.auto()
    FINISHED_ABORTED = enum.auto()

    @property
    def is_finished(self) -> bool:
        return self > RequestStatus.SWAPPED

    @property
    def finish_reason(self) -> str | None:
        return _FINISH_REASONS.get(self)


_FINISH_REASONS = {
    RequestStatus.FINISHED_STOPPED: "stop",
    RequestStatus.FINISHED_LENGTH: "length",
    RequestStatus.FINISHED_ABORTED: "abort",
}


class TokenView(SequenceABC[int]):
    """A read-only view of a token list that stays live as the owner appends to it."""

    __slots__ = ("_tokens",)

    def __init__(self, tokens: list[int]) -> None:
        self._tokens = tokens

    def __getitem__(self, index):  # type: ignore[override]
        return self._tokens[index]

    def __len__(self) -> int:
        return len(self._tokens)

    def __iter__(self):
        return iter(self._tokens)

    def __eq__(self, other: object) -> bool:
        return list(self._tokens) == list(other) if isinstance(other, SequenceABC) else False

    def __repr__(self) -> str:
        return f"TokenView({self._tokens!r})"


class Sequence:
    """One generated continuation of a request's prompt.

    The scheduler closes the gap between `num_computed_tokens` (tokens whose K/V is cached) and
    `num_tokens` (prompt + generated). A fresh prompt has a gap of the prompt length, a decoding
    sequence a gap of 1, and a sequence preempted by recompute starts again from 0 with its
    generated tokens folded into the prefill.
    """

    def __init__(self, request: Request, index: int, token_ids: list[int],
                 num_output_tokens: int, block_size: int) -> None:
        self.request = request
        self.index = index
        self.seq_id = f"{request.request_id}#{index}"
        self.status = RequestStatus.WAITING
        self.num_computed_tokens = 0
        self.cumulative_logprob = 0.0
        self.stop_token_id: int | None = None
        self._block_size = block_size
        self._all_token_ids = list(token_ids)
        self._num_prompt = len(token_ids) - num_output_tokens
        self.all_token_ids = TokenView(self._all_token_ids)
        # Hashes of the full blocks of all_token_ids (prefix caching), extended as they fill.
        self.block_hashes: list[int] = []
        # Leading blocks already offered to the prefix cache (reset when the blocks are freed).
        self.num_registered_blocks = 0
        extend_block_hashes(self.block_hashes, self._all_token_ids, block_size, self.num_tokens)

    @property
    def num_tokens(self) -> int:
        return len(self._all_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self._all_token_ids) - self._num_prompt

    @property
    def output_token_ids(self) -> list[int]:
        return self._all_token_ids[self._num_prompt :]

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    def append_token(self, token_id: int, logprob: float | None) -> None:
        """Adds a sampled token (logprob None where the params do not need it: the sum then
        stays 0 and is not reported)."""
        self._all_token_ids.append(token_id)
        if logprob is not None:
            self.cumulative_logprob += logprob
        extend_block_hashes(self.block_hashes, self._all_token_ids, self._block_size,
                            self.num_tokens)

    def fork(self, index: int) -> Sequence:
        """A copy with the same tokens and computed state, as a new sample of the request."""
        child = Sequence(self.request, index, self._all_token_ids,
                         self.num_output_tokens, self._block_size)
        child.status = self.status
        child.num_computed_tokens = self.num_computed_tokens
        child.cumulative_logprob = self.cumulative_logprob
        return child


class Request:
    """A sequence group: one prompt and the `best_of` sequences sampled from it.

    A fresh request holds one sequence. With best_of > 1, that sequence prefills all but the
    last prompt token, then forks into best_of sequences that share its blocks; each computes
    the last prompt token itself and samples its own continuation (copy-on-write keeps their
    partly filled last blocks apart).
    """

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: SequenceABC[int],
        sampling_params: SamplingParams,
        arrival_index: int,
        max_tokens: int,
        eos_token_id: int | None,
        block_size: int = 16,
        beam_search: BeamSearchParams | None = None,
    ) -> None:
        self.request_id = request_id
        self.sampling_params = sampling_params
        # Monotonic arrival order, used for first-come-first-served and preemption order.
        self.arrival_index = arrival_index
        # Generation cap after clamping to the model's context length.
        self.max_tokens = max_tokens
        self.eos_token_id = eos_token_id
        self.status = RequestStatus.WAITING
        self.num_preemptions = 0
        self._prompt_token_ids = list(prompt_token_ids)
        self.prompt_token_ids = TokenView(self._prompt_token_ids)
        self.best_of = sampling_params.best_of or sampling_params.n
        self.seqs = [Sequence(self, 0, self._prompt_token_ids, 0, block_size)]
        # Beam search: the search state, and the running beams best first. Beams fork and drop
        # as the search goes, so `seqs` holds every beam ever made (dropped ones finished).
        self.beam = BeamState(beam_search, eos_token_id) if beam_search is not None else None
        self.beam_seqs: list[Sequence] = list(self.seqs)
        # Beam index -> its next-token offers, gathered until every running beam has sampled.
        self.beam_offers: dict[int, list[tuple[int, float]]] = {}

    @property
    def num_prompt_tokens(self) -> int:
        return len(self._prompt_token_ids)

    @property
    def is_forked(self) -> bool:
        """True once the samples exist (beam search forks as it goes, never up front)."""
        return self.beam is not None or len(self.seqs) >= self.best_of

    @property
    def num_seqs_reserved(self) -> int:
        """Sequences this request counts against max_num_seqs (all samples, even before fork)."""
        if self.beam is not None:
            return self.beam.params.beam_width
        return len(self.live_seqs()) if self.is_forked else self.best_of

    def live_seqs(self) -> list[Sequence]:
        return [s for s in self.seqs if not s.is_finished]

    def prefill_limit(self, seq: Sequence) -> int:
        """How far `seq` may be computed now: short of the last prompt token until forked."""
        if self.is_forked:
            return seq.num_tokens
        return seq.num_tokens - 1

    def min_tokens_stop_ids(self, seq: Sequence) -> list[int]:
        """Token ids that may not be sampled yet because `min_tokens` is not reached."""
        params = self.sampling_params
        if seq.num_output_tokens >= params.min_tokens:
            return []
        ids = list(params.stop_token_ids or ())
        if self.eos_token_id is not None and not params.ignore_eos:
            ids.append(self.eos_token_id)
        return ids
