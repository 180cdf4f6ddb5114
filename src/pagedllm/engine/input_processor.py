"""Turns a user prompt into checked token ids before anything is queued: the one place where
a request is tokenized and validated (the offline API, the engine and the server all call
`InputProcessor.process` once per request)."""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pagedllm.core.beam_search import BeamSearchParams
from pagedllm.sampling_params import SamplingParams

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from pagedllm.structured_output.manager import StructuredOutputManager

# What `generate` and `add_request` accept: a string, or {"prompt_token_ids": [...]}
# (optionally with "prompt" for display), or {"prompt": "..."}.
PromptType = str | dict[str, Any]


@dataclass
class ProcessedRequest:
    """A request as the engine queues it: checked once, tokenized once. `LLMEngine.add_request`
    takes one as it is (vLLM's EngineCoreRequest plays this part)."""

    # The prompt's text where it had one (for display), and its token ids.
    prompt: str | None
    prompt_token_ids: list[int]
    # What the engine samples with; for a beam search, the greedy settings its steps use. A
    # constrained request's is a copy whose structured_outputs carries the compile.
    sampling_params: SamplingParams
    # max_tokens after clamping to the room left in the context (see default_max_tokens when
    # the request gave none).
    max_tokens: int
    # Set for a beam search (its max_tokens clamped as above).
    beam_search: BeamSearchParams | None = None


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
        self._structured_output: StructuredOutputManager | None = None

    @property
    def structured_output(self) -> StructuredOutputManager:
        """The grammar compiler, made on the first constrained request (over transformers'
        tokenizer, which llguidance's tables are built from)."""
        if self._structured_output is None:
            from pagedllm.structured_output.manager import StructuredOutputManager
            from pagedllm.tokenizer import hf_tokenizer

            self._structured_output = StructuredOutputManager(hf_tokenizer(self.tokenizer),
                                                              self.vocab_size)
        return self._structured_output

    def process(
        self,
        prompt: PromptType,
        params: SamplingParams | BeamSearchParams,
        *,
        refuse_past_context: bool = False,
        where: str = "prompt",
        param: str = "prompt",
        structured_param: str = "structured_outputs",
    ) -> ProcessedRequest:
        """Checks one request and tokenizes its prompt; every problem is a RequestFieldError.

        Args:
            params: SamplingParams, or BeamSearchParams for a beam search.
            refuse_past_context: refuse a max_tokens that runs past max_model_len (as an
                OpenAI server does) instead of clamping it (as the offline API does).
            where: how messages name the prompt ("prompt", "prompt at index 2", "messages").
            param: the request field a problem with the prompt is blamed on.
            structured_param: the field a bad constraint (structured_outputs) is blamed on.
        """
        beam_search = params if isinstance(params, BeamSearchParams) else None
        if beam_search is not None:
            # NOTE: the sampler is asked for the 2 x beam_width best raw log-probabilities of
            # each beam; EOS and length are judged by the beam search itself.
            width = beam_search.beam_width
            sampling_params = SamplingParams(
                temperature=0.0, max_tokens=beam_search.max_tokens,
                logprobs=2 * beam_search.beam_width, ignore_eos=True)
        elif isinstance(params, SamplingParams):
            sampling_params = params
            width = params.best_of or params.n
        else:
            raise ValueError(f"sampling_params must be a SamplingParams (or BeamSearchParams), "
                             f"got {type(params).__name__}")
        try:
            sampling_params.verify_token_ids(self.vocab_size)
        except ValueError as exc:
            in_stop = any(i >= self.vocab_size for i in sampling_params.stop_token_ids or ())
            raise RequestFieldError(str(exc), "stop_token_ids" if in_stop else "logit_bias"
                                    ) from None
        text, token_ids = self._tokenize(prompt)
        self._check_prompt(token_ids, where, param)
        num_prompt = len(token_ids)
        room = self.max_model_len - num_prompt
        requested = sampling_params.max_tokens
        if requested is None:
            max_tokens = self.default_max_tokens(num_prompt, width)
        elif requested > room and refuse_past_context:
            raise RequestFieldError(
                f"This model's maximum context length (max_model_len) is {self.max_model_len} "
                f"tokens. However, you requested {num_prompt + requested} tokens ({num_prompt} "
                f"in the {where}, {requested} in the completion). Please reduce the length of "
                f"the {where} or the completion.", "max_tokens")
        else:
            max_tokens = min(requested, room)
        if num_prompt + max_tokens > self.kv_capacity_tokens:
            message = (
                f"request needs {num_prompt + max_tokens} KV cache slots ({num_prompt} prompt + "
                f"{max_tokens} generated) but the whole cache holds {self.kv_capacity_tokens}: "
                "raise num_kv_blocks or kv_cache_memory_bytes, or lower max_tokens"
            )
            # Without max_tokens, the prompt alone fills the cache.
            raise RequestFieldError(message, param if requested is None else "max_tokens")
        self._check_fits(num_prompt, max_tokens, width, beam_search is not None)
        if beam_search is not None and max_tokens < beam_search.max_tokens:
            beam_search = dataclasses.replace(beam_search, max_tokens=max_tokens)
        if sampling_params.structured_outputs is not None:
            sampling_params = self._compile(sampling_params, structured_param)
        return ProcessedRequest(prompt=text, prompt_token_ids=list(token_ids),
                                sampling_params=sampling_params, max_tokens=max_tokens,
                                beam_search=beam_search)

    def _compile(self, params: SamplingParams, param: str) -> SamplingParams:
        """Validates the constraint (a RequestFieldError naming `param`) and starts its
        compile; returns a copy of `params` that carries it (the caller's stays as it was)."""
        structured = params.structured_outputs
        try:
            compiled = self.structured_output.compile(structured)
        except ValueError as exc:
            message, name = str(exc), f"structured_outputs.{structured.constraint}"
            if param != "structured_outputs" and message.startswith(name):
                message = param + message[len(name):]  # e.g. "response_format is invalid: ..."
            raise RequestFieldError(message, param) from None
        params = copy.copy(params)
        params.structured_outputs = structured.with_compiled(compiled)
        return params

    def _check_prompt(self, token_ids: list[int], where: str, param: str) -> None:
        if not token_ids:
            raise RequestFieldError(f"the {where} is empty: give at least one token", param)
        for position, token_id in enumerate(token_ids):
            if not isinstance(token_id, int) or isinstance(token_id, bool):
                raise RequestFieldError(
                    f"{where} token at position {position} is not an integer", param)
            if not 0 <= token_id < self.vocab_size:
                raise RequestFieldError(
                    f"{where} token id {token_id} at position {position} is outside the "
                    f"vocabulary [0, {self.vocab_size})", param)
        if len(token_ids) >= self.max_model_len:
            raise RequestFieldError(
                f"This model's maximum context length (max_model_len) is {self.max_model_len} "
                f"tokens. However, the {where} has {len(token_ids)} tokens, which leaves no "
                f"room to generate. Please reduce the length of the {where}.", param)

    def _check_fits(self, num_prompt: int, max_tokens: int, width: int, is_beam_search: bool
                    ) -> None:
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
                f"{width} sequences of up to {max_tokens} generated tokens (n={width}, "
                f"max_tokens={max_tokens}) may need {slots} KV cache slots but the whole cache "
                f"holds {self.kv_capacity_tokens}: lower n / best_of / beam width or max_tokens, "
                "or raise num_kv_blocks or kv_cache_memory_bytes",
                # NOTE: a beam search's width is its point; its length is what to lower.
                "max_tokens" if is_beam_search else "n",
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

