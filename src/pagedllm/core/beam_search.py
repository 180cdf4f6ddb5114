"""Beam search bookkeeping for one request, step by step, with transformers' selection rules.

Each step every running beam offers its 2 x beam_width most likely next tokens. Of all those
candidates, the 2 x beam_width best by cumulative log-probability are kept; the ones among the
first beam_width that end a hypothesis (EOS, or the length limit) compete for the beam_width
finished slots with score = cumulative logprob / generated_length ** length_penalty, and the
best beam_width that do not end continue as the running beams. The search stops when no
candidate can continue, or when all finished slots are taken and the best running beam can no
longer beat the worst of them (transformers' `early_stopping=False` heuristic).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from pagedllm.validation import is_int, is_number

# Score of an empty finished slot and of a masked candidate (as transformers uses).
_MASKED = -1.0e9


@dataclass(frozen=True)
class BeamSearchParams:
    """Settings of `LLM.beam_search`, with vLLM's names."""

    # Beams kept at each step, and sequences returned.
    beam_width: int
    # Most tokens generated per beam.
    max_tokens: int
    # Keep going past EOS (EOS then ends nothing).
    ignore_eos: bool = False
    # Only 0 (log-probabilities of the raw model distribution) is supported.
    temperature: float = 0.0
    # Finished scores are divided by generated_length ** length_penalty.
    length_penalty: float = 1.0

    def __post_init__(self) -> None:
        if not is_int(self.beam_width) or self.beam_width < 1:
            raise ValueError(f"beam_width must be an int >= 1, got {self.beam_width!r}")
        if not is_int(self.max_tokens) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an int >= 1, got {self.max_tokens!r}")
        if self.temperature != 0.0:
            raise ValueError(
                f"temperature must be 0.0 for beam search (raw log-probabilities), "
                f"got {self.temperature!r}"
            )
        if not is_number(self.length_penalty) or not math.isfinite(self.length_penalty):
            raise ValueError(f"length_penalty must be a finite number, got "
                             f"{self.length_penalty!r}")


@dataclass
class Hypothesis:
    """A finished beam: generated tokens, summed log-probability and length-penalised score."""

    token_ids: list[int]
    cumulative_logprob: float
    score: float
    # "stop" when the last token is EOS, else "length": the one place a beam's reason is set.
    finish_reason: str


@dataclass
class Candidate:
    """One possible continuation: beam `parent` (a running-beam position) extended by `token_id`."""

    parent: int
    token_id: int
    cumulative_logprob: float


@dataclass
class BeamStepResult:
    """Which running beams continue, and with which token; in the new beam order."""

    continuations: list[Candidate]
    done: bool


@dataclass
class BeamState:
    """The search state of one request; running beams live as engine sequences elsewhere."""

    params: BeamSearchParams
    eos_token_id: int | None
    finished: list[Hypothesis] = field(default_factory=list)
    # Whether a better finished hypothesis may still appear (the early-stop heuristic).
    improvement_possible: bool = True

    def step(
        self,
        beam_logprobs: list[float],
        beam_tokens: list[Sequence[int]],
        offers: list[list[tuple[int, float]]],
        num_generated: int,
    ) -> BeamStepResult:
        """Advances the search by one token.

        Args:
            beam_logprobs: cumulative log-probability of each running beam, best first.
            beam_tokens: the generated tokens of each running beam.
            offers: each beam's most likely (token id, log-probability) next tokens.
            num_generated: tokens generated so far by every running beam.
        """
        width = self.params.beam_width
        candidates = sorted(
            (Candidate(b, t, beam_logprobs[b] + lp)
             for b, row in enumerate(offers) for t, lp in row),
            key=lambda c: c.cumulative_logprob,
            reverse=True,
        )[: 2 * width]
        new_length = num_generated + 1
        ends = [self._ends(c.token_id, new_length) for c in candidates]

        if self.improvement_possible:
            for rank, (cand, end) in enumerate(zip(candidates, ends)):
                if end and rank < width:
                    score = self._score(cand.cumulative_logprob, new_length)
                    reason = "stop" if cand.token_id == self.eos_token_id else "length"
                    self.finished.append(
                        Hypothesis([*beam_tokens[cand.parent], cand.token_id],
                                   cand.cumulative_logprob, score, reason)
                    )
            self.finished.sort(key=lambda h: h.score, reverse=True)
            del self.finished[width:]

        continuations = [c for c, end in zip(candidates, ends) if not end][:width]
        if continuations and len(self.finished) == width:
            best_running = continuations[0].cumulative_logprob
            possible = self._score(best_running, new_length)
            self.improvement_possible &= possible > self.finished[-1].score
        done = not continuations or not self.improvement_possible
        return BeamStepResult(continuations, done)

    def _score(self, cumulative_logprob: float, length: int) -> float:
        """cumulative_logprob / length ** length_penalty (transformers' score), saturating
        where a large |length_penalty| overflows or underflows the power."""
        try:
            divisor = length ** self.params.length_penalty
        except OverflowError:
            divisor = math.inf
        if divisor == 0.0:
            return -math.inf if cumulative_logprob < 0 else 0.0
        return cumulative_logprob / divisor

    def _ends(self, token_id: int, new_length: int) -> bool:
        if new_length >= self.params.max_tokens:
            return True
        return not self.params.ignore_eos and token_id == self.eos_token_id

    def best(self) -> list[Hypothesis]:
        return list(self.finished)
