"""The offline API: `LLM(model).generate(prompts, sampling_params)`, as in vLLM."""

from __future__ import annotations

import dataclasses
import inspect
import itertools
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pagedllm.config import EngineConfig
from pagedllm.core.beam_search import BeamSearchParams
from pagedllm.engine.input_processor import ProcessedRequest, PromptType
from pagedllm.entrypoints.chat_utils import render_chat
from pagedllm.outputs import RequestOutput
from pagedllm.sampling_params import SamplingParams

if TYPE_CHECKING:
    from typing_extensions import Self

    from pagedllm.engine.llm_engine import LLMEngine

ChatMessages = list[dict[str, Any]]
_SETTINGS = {f.name for f in dataclasses.fields(EngineConfig)}


@dataclass
class BeamSearchSequence:
    """One beam: prompt + generated tokens and text (as vLLM returns them)."""

    tokens: list[int]
    text: str
    cum_logprob: float
    finish_reason: str | None


@dataclass
class BeamSearchOutput:
    """The beams of one prompt, best first by length-penalised score."""

    sequences: list[BeamSearchSequence]


class LLM:
    """Batch generation over an LLMEngine: submit everything, step until done, return in order."""

    def __init__(self, model: str | None = None, **kwargs: Any) -> None:
        """`model` and any EngineConfig setting as keywords (`dtype`, `block_size`,
        `num_kv_blocks`, ...: see `pagedllm.config.EngineConfig` for each one's default and
        meaning); an unknown keyword is a TypeError naming it."""
        unknown = sorted(set(kwargs) - _SETTINGS)
        if unknown:
            raise TypeError(f"LLM got unknown keyword arguments {unknown}; the engine's "
                            f"settings are {', '.join(sorted(_SETTINGS))}")
        self.llm_engine = _build_engine(model, kwargs)
        self._request_counter = itertools.count()

    def get_tokenizer(self):
        return self.llm_engine.get_tokenizer()

    def shutdown(self) -> None:
        """Stops the engine's worker processes (`distributed_executor_backend="mp"`); safe to
        call twice. Interpreter exit does the same for an LLM still open, and so does leaving
        `with LLM(...) as llm:`."""
        self.llm_engine.shutdown()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.shutdown()

    def generate(
        self,
        prompts: PromptType | Sequence[PromptType],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Generates for every prompt and returns the finished outputs in input order.

        Every prompt is checked before any work starts; a bad one raises ValueError naming
        its index, and nothing is queued.
        """
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        prompts = list(prompts)
        params_list = self._params_per_prompt(sampling_params, len(prompts))
        return self._add_and_run(self._process_all(prompts, params_list), "offline", use_tqdm)

    def chat(
        self,
        messages: ChatMessages | Sequence[ChatMessages],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        chat_template: str | None = None,
        add_generation_prompt: bool = True,
    ) -> list[RequestOutput]:
        """Applies the tokenizer's chat template to each conversation, then generates.

        Each output's `prompt` is the rendered conversation (as vLLM gives it). A conversation
        the template cannot render is a ValueError naming it.
        """
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        tokenizer = self.get_tokenizer()
        if chat_template is None and not tokenizer.chat_template:
            raise ValueError("the model's tokenizer has no chat template: pass chat_template")
        prompts = []
        for index, conversation in enumerate(conversations):
            try:
                text, token_ids = render_chat(tokenizer, list(conversation), chat_template,
                                              add_generation_prompt)
            except ValueError as exc:
                raise ValueError(f"conversation {index}: {exc}") from None
            prompts.append({"prompt": text, "prompt_token_ids": token_ids})
        return self.generate(prompts, sampling_params, use_tqdm)

    def beam_search(
        self,
        prompts: PromptType | Sequence[PromptType],
        params: BeamSearchParams,
        use_tqdm: bool = False,
    ) -> list[BeamSearchOutput]:
        """Beam search for each prompt; beams share KV blocks and fork by copy-on-write."""
        if not isinstance(params, BeamSearchParams):
            raise ValueError(f"params must be a BeamSearchParams, got {type(params).__name__}")
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        prompts = list(prompts)
        processed = self._process_all(prompts, [params] * len(prompts))
        tokenizer = self.get_tokenizer()
        results = []
        for output in self._add_and_run(processed, "beam", use_tqdm):
            prompt_ids = list(output.prompt_token_ids)
            results.append(BeamSearchOutput([
                BeamSearchSequence(
                    tokens=prompt_ids + c.token_ids,
                    text=(output.prompt or tokenizer.decode(prompt_ids)) + c.text,
                    cum_logprob=c.cumulative_logprob,
                    finish_reason=c.finish_reason,
                )
                for c in output.outputs
            ]))
        return results

    @staticmethod
    def _params_per_prompt(
        sampling_params: SamplingParams | Sequence[SamplingParams] | None, num_prompts: int
    ) -> list[SamplingParams]:
        if sampling_params is None:
            return [SamplingParams()] * num_prompts
        if isinstance(sampling_params, SamplingParams):
            return [sampling_params] * num_prompts
        params_list = list(sampling_params)
        if len(params_list) != num_prompts:
            raise ValueError(
                f"got {len(params_list)} sampling_params for {num_prompts} prompts: "
                "give one, or one per prompt"
            )
        return params_list

    def _process_all(self, prompts: list[PromptType],
                     params_list: Sequence[SamplingParams | BeamSearchParams]
                     ) -> list[ProcessedRequest]:
        """Checks and tokenizes every prompt before any is queued: a bad one raises ValueError
        naming its index, and nothing is queued."""
        processed = []
        for index, (prompt, params) in enumerate(zip(prompts, params_list)):
            try:
                processed.append(self.llm_engine.process_inputs(prompt, params))
            except ValueError as exc:
                raise ValueError(f"prompt {index}: {exc}") from None
        return processed

    def _add_and_run(self, processed: list[ProcessedRequest], kind: str, use_tqdm: bool
                     ) -> list[RequestOutput]:
        """Queues the processed requests as they are and steps until all have finished."""
        engine = self.llm_engine
        request_ids = [f"{kind}-{next(self._request_counter)}" for _ in processed]
        for request_id, request in zip(request_ids, processed):
            engine.add_request(request_id, request)
        finished: dict[str, RequestOutput] = {}
        from tqdm.auto import tqdm  # about 50 ms of a start that never shows a bar

        bar = tqdm(total=len(request_ids), desc="Processed prompts", disable=not use_tqdm)
        start = time.perf_counter()
        num_output_tokens = 0
        try:
            while engine.has_unfinished_requests():
                # Only final outputs are returned: per-step ones for running requests are not
                # built (a RequestOutput per request per step, its token list copied).
                for output in engine.step(finished_only=True):
                    if output.finished:
                        finished[output.request_id] = output
                        num_output_tokens += len(output.outputs[0].token_ids)
                        bar.update(1)
                        elapsed = time.perf_counter() - start
                        bar.set_postfix_str(f"output {num_output_tokens / elapsed:.1f} tok/s")
        except BaseException:
            engine.abort_request([r for r in request_ids if r not in finished])
            raise
        finally:
            bar.close()
        return [finished[r] for r in request_ids]


def _build_engine(model: str | None, settings: dict[str, Any]) -> LLMEngine:
    """The engine of these settings. In a fresh process (torch not imported yet: this module
    imports no torch) the weight cache file is read on a thread while torch and the engine are
    imported (models/weight_prefetch.py), and that import runs as pagedllm/gc_freeze.py's
    `importing` says."""
    from pagedllm import gc_freeze
    from pagedllm.models import weight_prefetch

    if "torch" not in sys.modules:
        weight_prefetch.start(model=model, **settings)
    try:
        with gc_freeze.importing():
            from pagedllm.engine.llm_engine import LLMEngine

            config = EngineConfig(model=model, **settings)
        return LLMEngine(config)
    finally:
        weight_prefetch.discard()  # what the loader did not take (a bad setting, say)


def _signature_from_settings() -> inspect.Signature:
    """LLM's signature as `help(LLM)` and editors show it: self, then every EngineConfig
    setting by keyword, with its default (the fields are the one source)."""
    params = [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    for f in dataclasses.fields(EngineConfig):
        kind = (inspect.Parameter.POSITIONAL_OR_KEYWORD if f.name == "model"
                else inspect.Parameter.KEYWORD_ONLY)
        params.append(inspect.Parameter(f.name, kind, default=f.default, annotation=f.type))
    return inspect.Signature(params, return_annotation=None)


LLM.__init__.__signature__ = _signature_from_settings()  # type: ignore[attr-defined]
