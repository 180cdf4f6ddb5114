"""What the engine hands back: RequestOutput and CompletionOutput, shaped like vLLM's."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Logprob:
    """Log-probability of one token, its 1-based rank and its text."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


# One dict per generated token: token id -> Logprob (the chosen token plus the top-k).
SampleLogprobs = list[dict[int, Logprob]]
# One entry per prompt token: None for the first (nothing predicts it), then as SampleLogprobs.
PromptLogprobs = list[dict[int, Logprob] | None]


@dataclass
class CompletionOutput:
    """One generated sequence of a request."""

    index: int
    text: str
    token_ids: list[int]
    # The sum of the tokens' logprobs; None unless logprobs or best_of > n were asked for
    # (as in vLLM).
    cumulative_logprob: float | None
    logprobs: SampleLogprobs | None
    # "stop", "length", "abort", or None while running.
    finish_reason: str | None = None
    # The stop string or stop token id that ended the sequence; None for EOS or length.
    stop_reason: int | str | None = None

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    """The state of one request after a step (cumulative: text and tokens so far)."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    # Wall-clock times (time.time()): "arrival", "first_token", "finished" once known.
    metrics: dict[str, float] = field(default_factory=dict)
    # With SamplingParams.prompt_logprobs: the prompt tokens' logprobs so far (all of them
    # once the prompt is computed), else None.
    prompt_logprobs: PromptLogprobs | None = None
