"""Request: the scheduler's per-request state; token lists change only through its methods."""

from __future__ import annotations

import enum
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pagedllm.sampling_params import SamplingParams


class RequestStatus(enum.IntEnum):
    """Lifecycle of a request; every finished state sorts after the live ones."""

    WAITING = enum.auto()
    RUNNING = enum.auto()
    FINISHED_STOPPED = enum.auto()
    FINISHED_LENGTH = enum.auto()
    FINISHED_ABORTED = enum.auto()

    @property
    def is_finished(self) -> bool:
        return self > RequestStatus.RUNNING

    @property
    def finish_reason(self) -> str | None:
        return _FINISH_REASONS.get(self)


_FINISH_REASONS = {
    RequestStatus.FINISHED_STOPPED: "stop",
    RequestStatus.FINISHED_LENGTH: "length",
    RequestStatus.FINISHED_ABORTED: "abort",
}


class TokenView(Sequence[int]):
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
        return list(self._tokens) == list(other) if isinstance(other, Sequence) else False

    def __repr__(self) -> str:
        return f"TokenView({self._tokens!r})"


class Request:
    """One generation request as the scheduler sees it.

    The scheduler closes the gap between `num_computed_tokens` (tokens whose K/V is cached) and
    `num_tokens` (prompt + generated). A fresh prompt has a gap of the prompt length, a decoding
    request a gap of 1, and a request preempted by recompute starts again from 0 with its
    generated tokens folded into the prefill.
    """

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: Sequence[int],
        sampling_params: SamplingParams,
        arrival_index: int,
        max_tokens: int,
        eos_token_id: int | None,
    ) -> None:
        self.request_id = request_id
        self.sampling_params = sampling_params
        # Monotonic arrival order, used for first-come-first-served and preemption order.
        self.arrival_index = arrival_index
        # Generation cap after clamping to the model's context length.
        self.max_tokens = max_tokens
        self.eos_token_id = eos_token_id
        self.status = RequestStatus.WAITING
        self.num_computed_tokens = 0
        self.num_preemptions = 0
        # The token that made the request finish with "stop", if any.
        self.stop_token_id: int | None = None
        self._prompt_token_ids = list(prompt_token_ids)
        self._output_token_ids: list[int] = []
        self._all_token_ids = list(prompt_token_ids)
        self.prompt_token_ids = TokenView(self._prompt_token_ids)
        self.output_token_ids = TokenView(self._output_token_ids)
        self.all_token_ids = TokenView(self._all_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self._prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self._output_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self._all_token_ids)

    def append_output_token(self, token_id: int) -> None:
        self._output_token_ids.append(token_id)
        self._all_token_ids.append(token_id)

    def min_tokens_stop_ids(self) -> list[int]:
        """Token ids that may not be sampled yet because `min_tokens` is not reached."""
        params = self.sampling_params
        if self.num_output_tokens >= params.min_tokens:
            return []
        ids = list(params.stop_token_ids or ())
        if self.eos_token_id is not None and not params.ignore_eos:
            ids.append(self.eos_token_id)
        return ids
