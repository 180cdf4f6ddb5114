"""Per-request sampling settings, with vLLM's field names, defaults and meanings."""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass

from pagedllm.structured_output.params import StructuredOutputsParams
from pagedllm.validation import is_int, is_number

# Temperatures below this are treated as 0 (greedy), as in vLLM.
SAMPLING_EPS = 1e-5


class SamplingType(enum.IntEnum):
    """How the sampler picks a row's token: the argmax (temperature below SAMPLING_EPS), a draw
    from the sampler's shared generator, or a draw seeded by the request's own `seed`."""

    GREEDY = 0
    RANDOM = 1
    RANDOM_SEED = 2


@dataclass
class SamplingParams:
    """How to sample the completion of one request.

    Invariants after construction: every field is within its documented range, `stop` and
    `stop_token_ids` are lists, `top_k` is 0 when off (vLLM's -1 is accepted and normalised to 0),
    and greedy requests (temperature < 1e-5) have the filters `top_p`, `top_k`, `min_p` reset to
    off, because greedy decoding ignores them.
    """

    n: int = 1
    """>= 1. Number of completions to return; they share the prompt's KV blocks."""

    best_of: int | None = None
    """None (= n) or >= n. Completions generated; the n with the highest cumulative logprob
    are returned. Needs random sampling when > 1."""

    presence_penalty: float = 0.0
    """In [-2, 2]. Subtracted from the logit of every token that already appears in the output;
    > 0 encourages new tokens, < 0 encourages repetition."""

    frequency_penalty: float = 0.0
    """In [-2, 2]. Subtracted from a token's logit once per occurrence in the output so far."""

    repetition_penalty: float = 1.0
    """> 0. For tokens in the prompt or the output: positive logits are divided by it and negative
    logits multiplied by it. > 1 discourages repetition, 1 is off."""

    temperature: float = 1.0
    """>= 0. Logits are divided by it before sampling; lower is more deterministic and 0 means
    greedy (argmax)."""

    top_p: float = 1.0
    """In (0, 1]. Sample only from the smallest set of most likely tokens whose cumulative
    probability reaches `top_p`; 1 is off."""

    top_k: int = 0
    """0 (off) or >= 1: sample only from the `top_k` most likely tokens. -1 also means off and is
    stored as 0."""

    min_p: float = 0.0
    """In [0, 1]. Drop tokens whose probability is below `min_p` times the most likely token's
    probability; 0 is off."""

    seed: int | None = None
    """Makes sampling reproducible: the noise for the k-th generated token depends only on
    (`seed`, k), not on the batch the request shares or on preemption."""

    stop: str | list[str] | None = None
    """Strings that end generation when produced; stored as a list of non-empty strings."""

    stop_token_ids: list[int] | None = None
    """Token ids (>= 0) that end generation, in addition to EOS; stored as a list."""

    ignore_eos: bool = False
    """Keep generating after EOS (useful for benchmarks)."""

    max_tokens: int | None = 16
    """>= 1: maximum number of tokens to generate. None means up to the context limit."""

    min_tokens: int = 0
    """In [0, max_tokens]: EOS and `stop_token_ids` are forbidden until this many tokens exist."""

    logprobs: int | None = None
    """>= 0: also return this many top log-probabilities per generated token (the chosen token's
    log-probability is always returned). None returns no top list."""

    prompt_logprobs: int | None = None
    """>= 0: also return the prompt tokens' log-probabilities (`RequestOutput.prompt_logprobs`),
    each with this many top alternatives. A request asking for them computes its whole prompt
    (no prefix-cache hits), as in vLLM."""

    include_stop_str_in_output: bool = False
    """Keep the matched stop string at the end of the output text."""

    skip_special_tokens: bool = True
    """Leave special tokens out of the detokenized text."""

    spaces_between_special_tokens: bool = True
    """Put spaces between special tokens in the detokenized text."""

    logit_bias: dict[int, float] | None = None
    """Token id (>= 0) -> finite bias added to that token's logit before anything else."""

    structured_outputs: StructuredOutputsParams | None = None
    """A constraint on the output (JSON schema, regex, choice, grammar or any JSON object);
    None generates freely."""

    def __post_init__(self) -> None:
        self._verify_penalties()
        self._verify_filters()
        self._verify_counts()
        self._verify_lengths()
        self._verify_stops()
        self._verify_logit_bias()
        if self.structured_outputs is not None and not isinstance(
                self.structured_outputs, StructuredOutputsParams):
            raise ValueError(f"structured_outputs must be a StructuredOutputsParams or None, "
                             f"got {type(self.structured_outputs).__name__}")
        if self.is_greedy:
            # NOTE: greedy ignores the filters; resetting them keeps batches uniform and makes
            # `SamplingParams(temperature=0, top_k=5) == SamplingParams(temperature=0)`.
            self.top_p, self.top_k, self.min_p = 1.0, 0, 0.0

    @property
    def sampling_type(self) -> SamplingType:
        if self.temperature < SAMPLING_EPS:
            return SamplingType.GREEDY
        if self.seed is not None:
            return SamplingType.RANDOM_SEED
        return SamplingType.RANDOM

    @property
    def is_greedy(self) -> bool:
        return self.sampling_type == SamplingType.GREEDY

    @property
    def needs_sampled_logprobs(self) -> bool:
        """Whether the chosen tokens' logprobs are computed: for `logprobs`, and for best_of > n,
        which ranks samples by them. Otherwise cumulative_logprob is None (as in vLLM), which
        saves the sampler a pass of exps over the vocabulary per row."""
        return self.logprobs is not None or (self.best_of or self.n) > self.n

    def verify_token_ids(self, vocab_size: int) -> None:
        """Raises ValueError if a token id in `stop_token_ids` or `logit_bias` is out of vocab.

        Separate from `__post_init__` because only the engine knows the vocabulary size.
        """
        ids = list(self.stop_token_ids or []) + list(self.logit_bias or {})
        bad = sorted({i for i in ids if i >= vocab_size})
        if bad:
            raise ValueError(
                f"token ids {bad} in stop_token_ids/logit_bias are out of the vocabulary "
                f"(size {vocab_size}); use ids in [0, {vocab_size - 1}]"
            )

    # ---- validation -----------------------------------------------------------------------

    def _verify_counts(self) -> None:
        if not is_int(self.n) or self.n < 1:
            raise ValueError(f"n must be an int >= 1, got {self.n!r}")
        if self.best_of is not None and (not is_int(self.best_of) or self.best_of < self.n):
            raise ValueError(
                f"best_of must be None or an int >= n ({self.n}), got {self.best_of!r}"
            )
        if (self.best_of or self.n) > 1 and self.temperature < SAMPLING_EPS:
            raise ValueError(
                f"n and best_of must be 1 with greedy sampling (temperature 0), got "
                f"n={self.n}, best_of={self.best_of}: raise the temperature or use beam search"
            )
        if self.seed is not None and not is_int(self.seed):
            raise ValueError(f"seed must be an int or None, got {self.seed!r}")
        if self.logprobs is not None and (not is_int(self.logprobs) or self.logprobs < 0):
            raise ValueError(f"logprobs must be an int >= 0 or None, got {self.logprobs!r}")
        if self.prompt_logprobs is not None and (
                not is_int(self.prompt_logprobs) or self.prompt_logprobs < 0):
            raise ValueError(
                f"prompt_logprobs must be an int >= 0 or None, got {self.prompt_logprobs!r}")

    def _verify_penalties(self) -> None:
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            # NOTE: written as `not (a <= x <= b)` so that NaN fails too.
            if not is_number(value) or not (-2.0 <= value <= 2.0):
                raise ValueError(f"{name} must be in [-2, 2], got {value!r}")
            setattr(self, name, float(value))
        rep = self.repetition_penalty
        if not is_number(rep) or not (rep > 0.0) or math.isinf(rep):
            raise ValueError(f"repetition_penalty must be > 0 and finite, got {rep!r}")
        self.repetition_penalty = float(rep)

    def _verify_filters(self) -> None:
        temp = self.temperature
        if not is_number(temp) or not (temp >= 0.0) or math.isinf(temp):
            raise ValueError(f"temperature must be >= 0 and finite, got {temp!r}")
        self.temperature = float(temp)
        if not is_number(self.top_p) or not (0.0 < self.top_p <= 1.0):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        self.top_p = float(self.top_p)
        if not is_int(self.top_k) or self.top_k < -1:
            raise ValueError(f"top_k must be -1, 0 or >= 1 (-1 and 0 mean off), got {self.top_k!r}")
        self.top_k = max(int(self.top_k), 0)
        if not is_number(self.min_p) or not (0.0 <= self.min_p <= 1.0):
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p!r}")
        self.min_p = float(self.min_p)

    def _verify_lengths(self) -> None:
        if self.max_tokens is not None and (not is_int(self.max_tokens) or self.max_tokens < 1):
            raise ValueError(f"max_tokens must be an int >= 1 or None, got {self.max_tokens!r}")
        if not is_int(self.min_tokens) or self.min_tokens < 0:
            raise ValueError(f"min_tokens must be an int >= 0, got {self.min_tokens!r}")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(
                f"min_tokens must be <= max_tokens ({self.max_tokens}), got {self.min_tokens}"
            )

    def _verify_stops(self) -> None:
        stop = self.stop
        if stop is None:
            stop = []
        elif isinstance(stop, str):
            stop = [stop]
        elif isinstance(stop, (list, tuple)):
            stop = list(stop)
        else:
            raise ValueError(f"stop must be a str, a list of str or None, got {stop!r}")
        for s in stop:
            if not isinstance(s, str) or not s:
                raise ValueError(f"stop must contain only non-empty strings, got {s!r}")
        self.stop = stop

        ids = self.stop_token_ids
        if ids is None:
            ids = []
        elif isinstance(ids, (str, bytes)) or not hasattr(ids, "__iter__"):
            raise ValueError(f"stop_token_ids must be a list of int or None, got {ids!r}")
        ids = list(ids)
        for i in ids:
            if not is_int(i) or i < 0:
                raise ValueError(f"stop_token_ids must contain only ints >= 0, got {i!r}")
        self.stop_token_ids = [int(i) for i in ids]

    def _verify_logit_bias(self) -> None:
        bias = self.logit_bias
        if bias is None:
            return
        if not isinstance(bias, dict):
            raise ValueError(f"logit_bias must be a dict[int, float] or None, got {bias!r}")
        for token_id, value in bias.items():
            if not is_int(token_id) or token_id < 0:
                raise ValueError(f"logit_bias keys must be token ids (ints >= 0), got {token_id!r}")
            if not is_number(value) or not math.isfinite(value):
                raise ValueError(
                    f"logit_bias values must be finite numbers, got {value!r} for token {token_id}"
                )
        self.logit_bias = {int(k): float(v) for k, v in bias.items()}
