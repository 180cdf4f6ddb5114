"""Request (a sequence group) and its Sequences: the scheduler's per-request state.

A sequence's tokens and counters change only through its own methods; everyone else reads
live views (`TokenView`) and properties.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence as SequenceABC
from typing import TYPE_CHECKING

from pagedllm.core.beam_search import BeamSearchParams, BeamState
from pagedllm.core.block_hash import extend_block_hashes

if TYPE_CHECKING:
    from concurrent.futures import Future

    from pagedllm.sampling_params import SamplingParams
    from pagedllm.structured_output.backend import StructuredOutputGrammar


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
        """Equal to a list, tuple or view of the same tokens (like list == list)."""
        if isinstance(other, TokenView):
            return self._tokens == other._tokens
        if isinstance(other, list):
            return self._tokens == other
        return isinstance(other, SequenceABC) and self._tokens == list(other)

    def __repr__(self) -> str:
        return f"TokenView({self._tokens!r})"


class Sequence:
    """One generated continuation of a request's prompt.

    The scheduler closes the gap between `num_computed_tokens` (tokens whose K/V is cached) and
    `num_tokens` (prompt + generated). A fresh prompt has a gap of the prompt length, a decoding
    sequence a gap of 1, and a sequence preempted by recompute starts again from 0 with its
    generated tokens folded into the prefill.

    The counters and token lists change only through the methods below. `status` follows the
    request's queue (Request.set_live_status) until `finish` ends the sequence.

    A constrained sequence holds its own grammar, advanced by every token it appends, so the
    grammar always stands at the end of `output_token_ids`: preemption (by swap or recompute,
    which keeps the generated tokens) leaves it right.
    """

    def __init__(self, request: Request, index: int, token_ids: SequenceABC[int],
                 num_output_tokens: int, block_size: int) -> None:
        self.request = request
        self.index = index
        self.seq_id = f"{request.request_id}#{index}"
        self.status = RequestStatus.WAITING
        self._num_computed_tokens = 0
        self._cumulative_logprob = 0.0
        self._stop_token_id: int | None = None
        self._block_size = block_size
        self._all_token_ids = list(token_ids)
        # NOTE: the generated tokens are kept a second time so that `output_token_ids` is a view
        # (no copy per step), as the sampler reads it for every decode.
        self._output_token_ids = self._all_token_ids[len(token_ids) - num_output_tokens :]
        self.all_token_ids = TokenView(self._all_token_ids)
        self.output_token_ids = TokenView(self._output_token_ids)
        # Hashes of the full blocks of all_token_ids (prefix caching), extended as they fill.
        self.block_hashes: list[int] = []
        self._num_registered_blocks = 0
        self._grammar: StructuredOutputGrammar | None = None
        extend_block_hashes(self.block_hashes, self._all_token_ids, block_size, self.num_tokens)

    @property
    def num_tokens(self) -> int:
        return len(self._all_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self._output_token_ids)

    @property
    def num_computed_tokens(self) -> int:
        """Leading tokens whose keys/values are in the cache (computed, or found there)."""
        return self._num_computed_tokens

    @property
    def num_registered_blocks(self) -> int:
        """Leading full blocks already offered to the prefix cache (0 again once freed)."""
        return self._num_registered_blocks

    @property
    def cumulative_logprob(self) -> float:
        return self._cumulative_logprob

    @property
    def stop_token_id(self) -> int | None:
        """The EOS or stop token that finished the sequence, if one did."""
        return self._stop_token_id

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    @property
    def grammar(self) -> StructuredOutputGrammar | None:
        """The sequence's grammar state, for its bitmask (None when unconstrained)."""
        return self._grammar

    def init_grammar(self, grammar: StructuredOutputGrammar) -> None:
        """Constrains the sequence from its first generated token on."""
        assert self._grammar is None and self.num_output_tokens == 0
        self._grammar = grammar

    def advance_computed(self, num_tokens: int) -> None:
        """Counts `num_tokens` more tokens as cached: computed by a step, or a prefix hit."""
        assert num_tokens >= 0 and self._num_computed_tokens + num_tokens <= self.num_tokens
        self._num_computed_tokens += num_tokens

    def mark_registered(self, num_blocks: int) -> None:
        """Records that the first `num_blocks` full blocks are offered to the prefix cache."""
        assert num_blocks >= self._num_registered_blocks
        self._num_registered_blocks = num_blocks

    def reset_computed(self) -> None:
        """Forgets the cache: the blocks were freed (preemption by recompute)."""
        self._num_computed_tokens = 0
        self._num_registered_blocks = 0

    def append_token(self, token_id: int, logprob: float | None) -> None:
        """Adds a sampled token (logprob None where the params do not need it: the sum then
        stays 0 and is not reported)."""
        if logprob is not None:
            self._cumulative_logprob += logprob
        self._append(token_id)

    def append_beam_token(self, token_id: int, cumulative_logprob: float) -> None:
        """Adds the token a beam search step chose, with the beam's new sum (the search adds
        the token's log-probability itself)."""
        self._cumulative_logprob = cumulative_logprob
        self._append(token_id)

    def _append(self, token_id: int) -> None:
        if self._grammar is not None:
            self._grammar.accept_tokens((token_id,))
        self._all_token_ids.append(token_id)
        self._output_token_ids.append(token_id)
        extend_block_hashes(self.block_hashes, self._all_token_ids, self._block_size,
                            self.num_tokens)

    def finish(self, status: RequestStatus, stop_token_id: int | None = None) -> None:
        """Ends the sequence; `stop_token_id` is the EOS or stop token that ended it, if any."""
        assert status.is_finished
        self.status = status
        self._stop_token_id = stop_token_id

    def fork(self, index: int) -> Sequence:
        """A copy with the same tokens and computed state, as a new sample of the request."""
        child = Sequence(self.request, index, self._all_token_ids,
                         self.num_output_tokens, self._block_size)
        child.status = self.status
        child._num_computed_tokens = self._num_computed_tokens
        child._cumulative_logprob = self._cumulative_logprob
        if self._grammar is not None:
            child._grammar = self._grammar.copy()
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
        self._beam_offers: dict[int, list[tuple[int, float]]] = {}
        # Structured outputs: the compile of the request's constraint until it is done and
        # every sequence holds its own copy (then None).
        structured = sampling_params.structured_outputs
        self.is_structured = structured is not None
        self._compiled: Future[StructuredOutputGrammar] | None = None
        if structured is not None:
            assert structured.compiled is not None, (
                "a constrained request comes through InputProcessor.process, which compiles it")
            self._compiled = structured.compiled

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

    @property
    def pending_grammar(self) -> Future[StructuredOutputGrammar] | None:
        """The grammar compile the request still waits for, if any."""
        return self._compiled

    def grammar_ready(self) -> bool:
        """Whether the request may run: it is unconstrained, or its grammar has compiled (then
        each sequence gets its own copy of it, here, once)."""
        if self._compiled is None:
            return True
        if not self._compiled.done():
            return False
        template = self._compiled.result()
        for seq in self.seqs:
            seq.init_grammar(template.copy())
        self._compiled = None
        return True

    def live_seqs(self) -> list[Sequence]:
        return [s for s in self.seqs if not s.is_finished]

    def set_live_status(self, status: RequestStatus) -> None:
        """Moves the request and its live sequences between the scheduler's queues."""
        assert not status.is_finished, "sequences end through Sequence.finish"
        self.status = status
        for seq in self.live_seqs():
            seq.status = status

    def fork_seq(self, parent: Sequence) -> Sequence:
        """Adds a new sequence copied from `parent` (its blocks are the caller's to share)."""
        child = parent.fork(len(self.seqs))
        self.seqs.append(child)
        return child

    def prefill_limit(self, seq: Sequence) -> int:
        """How far `seq` may be computed now: short of the last prompt token until forked."""
        if self.is_forked:
            return seq.num_tokens
        return seq.num_tokens - 1

    def add_beam_offer(self, seq: Sequence, offers: list[tuple[int, float]]) -> bool:
        """Keeps a beam's next-token offers; True once every running beam has offered.

        NOTE: a beam that sampled waits (its gap is 0) until every beam has sampled, which may
        take several steps when prefills are chunked.
        """
        self._beam_offers[seq.index] = offers
        return all(beam.index in self._beam_offers for beam in self.beam_seqs)

    def take_beam_offers(self) -> list[list[tuple[int, float]]]:
        """The offers of every running beam, in beam order, for one beam search step."""
        offers = [self._beam_offers[beam.index] for beam in self.beam_seqs]
        self._beam_offers = {}
        return offers

    def drop_beam_offers(self) -> None:
        """Forgets the offers gathered so far: the beams were preempted and will sample anew."""
        self._beam_offers = {}
