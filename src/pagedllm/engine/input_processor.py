"""Turns a user prompt into checked token ids before anything is queued."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from transformers import PreTrainedTokenizerBase

from pagedllm.sampling_params import SamplingParams

# What `generate` and `add_request` accept: a string, or {"prompt_token_ids": [...]}
# (optionally with "prompt" for display), or {"prompt": "..."}.
PromptType = str | dict[str, Any]


@dataclass
class ProcessedPrompt:
    prompt: str | None
    prompt_token_ids: list[int]
    # max_tokens after clamping to the room left in the context (see default_max_tokens when
    # the request gave none).
    max_tokens: int


class RequestFieldError(ValueError):
    """A refusal caused by one request field: `param` names it (a server answers with it as
    the error's param)."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class InputProcessor:
    """Validates prompts and sampling settings; every problem is a ValueError saying what to fix."""

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        vocab_size: int,
        max_model_len: int,
        kv_capacity_tokens: int,
        block_size: int = 16,
        max_num_seqs: int | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.max_model_len = max_model_len
        self.kv_capacity_tokens = kv_capacity_tokens
        self.block_size = block_size
        self.max_num_seqs = max_num_seqs

    def process(
        self, prompt: PromptType, sampling_params: SamplingParams, width: int | None = None
    ) -> ProcessedPrompt:
        """Validates one request; `width` is how many sequences it runs at once (default:
        best_of or n; the beam width for beam search)."""
        if not isinstance(sampling_params, SamplingParams):
            raise ValueError(
                f"sampling_params must be a SamplingParams, got {type(sampling_params).__name__}"
            )
        sampling_params.verify_token_ids(self.vocab_size)
        text, token_ids = self._tokenize(prompt)
        if not token_ids:
            raise ValueError("prompt is empty: give at least one token")
        for position, token_id in enumerate(token_ids):
            if not isinstance(token_id, int) or isinstance(token_id, bool):
                raise ValueError(f"prompt token at position {position} is not an integer")
            if not 0 <= token_id < self.vocab_size:
                raise ValueError(
                    f"prompt token id {token_id} at position {position} is outside the "
                    f"vocabulary [0, {self.vocab_size})"
                )
        num_prompt = len(token_ids)
        if num_prompt >= self.max_model_len:
            raise ValueError(
                f"prompt has {num_prompt} tokens but max_model_len is {self.max_model_len}: "
                "shorten the prompt (it must leave room for at least one generated token)"
            )
        if width is None:
            width = sampling_params.best_of or sampling_params.n
        if sampling_params.max_tokens is None:
            max_tokens = self.default_max_tokens(num_prompt, width)
        else:
            max_tokens = min(sampling_params.max_tokens, self.max_model_len - num_prompt)
        if num_prompt + max_tokens > self.kv_capacity_tokens:
            message = (
                f"request needs {num_prompt + max_tokens} KV cache slots ({num_prompt} prompt + "
                f"{max_tokens} generated) but the whole cache holds {self.kv_capacity_tokens}: "
                "raise num_kv_blocks or kv_cache_memory_bytes, or lower max_tokens"
            )
            if sampling_params.max_tokens is None:  # the prompt alone fills the cache
                raise ValueError(message)
            raise RequestFieldError(message, "max_tokens")
        self._check_fits(num_prompt, max_tokens, width)
        return ProcessedPrompt(prompt=text, prompt_token_ids=list(token_ids), max_tokens=max_tokens)

    def _check_fits(self, num_prompt: int, max_tokens: int, width: int) -> None:
        """A sequence group is scheduled whole, so one that can never fit would wait forever."""
        if self.max_num_seqs is not None and width > self.max_num_seqs:
            raise RequestFieldError(
                f"request runs {width} sequences at once (n / best_of / beam width) but "
                f"max_num_seqs is {self.max_num_seqs}: lower it or raise max_num_seqs", "n"
            )
        if width == 1:
            return
        slots = self.worst_case_slots(num_prompt, max_tokens, width)
        if slots > self.kv_capacity_tokens:
            raise RequestFieldError(
                f"{width} sequences of up to {max_tokens} generated tokens may need "
                f"{slots} KV cache slots but the whole cache holds "
                f"{self.kv_capacity_tokens}: lower n / best_of / beam width or max_tokens, or "
                "raise num_kv_blocks or kv_cache_memory_bytes", "n"
            )

    def default_max_tokens(self, num_prompt: int, width: int) -> int:
        """max_tokens when a request gives none: to the end of the context, or the most the
        whole KV cache takes for `width` sequences of this prompt (the checks' own bounds),
        whichever comes first (at least 1: a request that cannot fit even that is refused by
        the checks)."""
        low, high = 1, self.max_model_len - num_prompt  # the largest fitting value, by bisection
        while low < high:
            mid = (low + high + 1) // 2
            if self._fits(num_prompt, mid, width):
                low = mid
            else:
                high = mid - 1
        return low

    def _fits(self, num_prompt: int, max_tokens: int, width: int) -> bool:
        """Whether the cache checks of `process` and `_check_fits` pass."""
        if num_prompt + max_tokens > self.kv_capacity_tokens:
            return False
        return width == 1 or (
            self.worst_case_slots(num_prompt, max_tokens, width) <= self.kv_capacity_tokens)

    def worst_case_slots(self, num_prompt: int, max_tokens: int, width: int) -> int:
        """KV slots a group of `width` sequences may hold at most. Running, they share only
        the prompt's blocks, and each fills its own blocks plus one copied-on-write tail;
        preempted by recompute, they come back as `width` sequences of their own (nothing
        shared), and the whole group must fit at once to run again."""
        bs = self.block_size
        shared = -(-num_prompt // bs) + width * (-(-max_tokens // bs) + 1)
        if width == 1:
            return shared * bs
        unshared = width * -(-(num_prompt + max_tokens) // bs)
        return max(shared, unshared) * bs

    def _tokenize(self, prompt: PromptType) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            return prompt, self.tokenizer.encode(prompt)
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                token_ids = prompt["prompt_token_ids"]
                if not isinstance(token_ids, (list, tuple)):
                    raise ValueError("prompt_token_ids must be a list of integers")
                return prompt.get("prompt"), list(token_ids)
            if isinstance(prompt.get("prompt"), str):
                return prompt["prompt"], self.tokenizer.encode(prompt["prompt"])
        raise ValueError(
            "a prompt must be a string, {'prompt': str} or {'prompt_token_ids': list[int]}, "
            f"got {type(prompt).__name__}"
        )

