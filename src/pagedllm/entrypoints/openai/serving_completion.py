"""POST /v1/completions: one engine request per prompt, `n` choices each, streamed or whole."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

from pagedllm.engine.input_processor import RequestFieldError
from pagedllm.entrypoints.openai.errors import aborted_error, error_from_exception
from pagedllm.entrypoints.openai.logprobs import iter_logprobs
from pagedllm.entrypoints.openai.prompt_tokenizer import encode_prompts
from pagedllm.entrypoints.openai.protocol import (
    CompletionLogProbs,
    CompletionRequest,
    CompletionResponse,
    CompletionResponseChoice,
    CompletionStreamResponse,
    ErrorResponse,
    UsageInfo,
    random_id,
)
from pagedllm.entrypoints.openai.request_params import (
    build_sampling_params,
    check_stream_options,
    process_prompt,
)
from pagedllm.entrypoints.openai.serving_engine import OpenAIServing
from pagedllm.entrypoints.openai.streaming import SSE_DONE, merge_async_iterators, sse
from pagedllm.outputs import CompletionOutput, RequestOutput
from pagedllm.sampling_params import SamplingParams

# (prompt text, or None for a token-id prompt; prompt token ids) per prompt of the request.
Prompt = tuple[str | None, list[int]]


class OpenAIServingCompletion(OpenAIServing):
    """Choices are numbered prompt-major: choice `i * n + k` is completion k of prompt i.

    With `use_beam_search` the k-th choice of a prompt is its k-th best beam; a stream sends
    each beam whole, once the search has ended (as vLLM does).
    """

    async def create_completion(
        self, request: CompletionRequest
    ) -> CompletionResponse | ErrorResponse | AsyncIterator[str]:
        error = self.models.check_model(request.model)
        if error is not None:
            return error
        try:
            params = self._sampling_params(request)
            prompts = await self._tokenize_prompts(request.prompt)
            processed = [
                process_prompt(self.engine, request, params, request.n, token_ids, text,
                               "prompt" if len(prompts) == 1 else f"prompt at index {i}",
                               param="prompt")
                for i, (text, token_ids) in enumerate(prompts)]
        except ValueError as exc:
            return error_from_exception(exc)
        request_id = random_id("cmpl")
        generators = [self.engine.generate(p, None, f"{request_id}-{i}")
                      for i, p in enumerate(processed)]
        if request.echo:
            prompts = [(text if text is not None else self.tokenizer.decode(ids), ids)
                       for text, ids in prompts]
        model = self.models.model_name(request.model)
        if request.stream:
            return self._stream(request, request_id, model, prompts, params,
                                merge_async_iterators(generators))
        return await self._full(request, request_id, model, prompts, params,
                                merge_async_iterators(generators))

    def _sampling_params(self, request: CompletionRequest) -> SamplingParams:
        check_stream_options(request.stream, request.stream_options)
        if request.suffix is not None:
            raise RequestFieldError("suffix is not supported", param="suffix")
        if request.echo and request.logprobs is not None:
            raise RequestFieldError("echo with logprobs is not supported: the engine does "
                                    "not compute prompt log-probabilities", param="echo")
        if (request.stream and not request.use_beam_search and request.best_of is not None
                and request.best_of != request.n):
            raise RequestFieldError("best_of must equal n when streaming", param="best_of")
        return build_sampling_params(
            request, max_num_seqs=self.engine.max_num_seqs, n=request.n, best_of=request.best_of,
            max_tokens=request.max_tokens,
            logprobs=request.logprobs, temperature=request.temperature, top_p=request.top_p,
            seed=request.seed, stop=request.stop, presence_penalty=request.presence_penalty,
            frequency_penalty=request.frequency_penalty, logit_bias=request.logit_bias,
        )

    async def _tokenize_prompts(self, prompt: str | list) -> list[Prompt]:
        if isinstance(prompt, str):
            prompt = [prompt]
        elif not prompt:
            raise RequestFieldError("the prompt is empty: give at least one token",
                                    param="prompt")
        if isinstance(prompt[0], str):
            token_ids = await self.prompt_tokenizer.run(encode_prompts, prompt)
            return list(zip(prompt, token_ids))
        if isinstance(prompt[0], int):
            prompt = [prompt]
        return [(None, list(ids)) for ids in prompt]

    async def _full(
        self,
        request: CompletionRequest,
        request_id: str,
        model: str,
        prompts: list[Prompt],
        params: SamplingParams,
        results: AsyncIterator[tuple[int, RequestOutput]],
    ) -> CompletionResponse | ErrorResponse:
        final: list[RequestOutput | None] = [None] * len(prompts)
        try:
            async for index, output in results:
                final[index] = output
        except (ValueError, RuntimeError) as exc:
            return error_from_exception(exc)
        aborted = aborted_error([output for output in final if output is not None])
        if aborted is not None:
            return aborted
        choices = []
        usage = UsageInfo()
        for index, output in enumerate(final):
            assert output is not None
            usage.prompt_tokens += len(output.prompt_token_ids)
            for completion in sorted(output.outputs, key=lambda c: c.index):
                usage.completion_tokens += len(completion.token_ids)
                prefix = prompts[index][0] or "" if request.echo else ""
                choices.append(CompletionResponseChoice(
                    index=index * request.n + completion.index,
                    text=prefix + completion.text,
                    logprobs=self._logprobs(completion, 0, params, len(prefix)),
                    finish_reason=completion.finish_reason,
                    stop_reason=completion.stop_reason,
                ))
        usage.total_tokens = usage.prompt_tokens + usage.completion_tokens
        return CompletionResponse(id=request_id, model=model, choices=choices, usage=usage)

    async def _stream(
        self,
        request: CompletionRequest,
        request_id: str,
        model: str,
        prompts: list[Prompt],
        params: SamplingParams,
        results: AsyncIterator[tuple[int, RequestOutput]],
    ) -> AsyncIterator[str]:
        created = int(time.time())
        # Per choice index: characters and tokens sent so far; finished choices.
        num_chars_sent: dict[int, int] = {}
        num_tokens_sent: dict[int, int] = {}
        num_prompt_tokens = [0] * len(prompts)
        done: set[int] = set()
        try:
            async for index, output in results:
                num_prompt_tokens[index] = len(output.prompt_token_ids)
                for completion in output.outputs:
                    choice = index * request.n + completion.index
                    if choice in done:
                        continue
                    first = choice not in num_chars_sent
                    delta = completion.text[num_chars_sent.get(choice, 0):]
                    prefix = prompts[index][0] or "" if request.echo and first else ""
                    if not (prefix or delta or completion.finish_reason):
                        continue  # tokens whose text is held back: send them with the text
                    offset = num_chars_sent.get(choice, 0) + (
                        len(prompts[index][0] or "") if request.echo else 0)
                    logprobs = self._logprobs(completion, num_tokens_sent.get(choice, 0),
                                              params, offset)
                    num_chars_sent[choice] = len(completion.text)
                    num_tokens_sent[choice] = len(completion.token_ids)
                    if completion.finish_reason is not None:
                        done.add(choice)
                    yield sse(CompletionStreamResponse(
                        id=request_id, created=created, model=model,
                        choices=[CompletionResponseChoice(
                            index=choice, text=prefix + delta, logprobs=logprobs,
                            finish_reason=completion.finish_reason,
                            stop_reason=completion.stop_reason,
                        )],
                    ))
            if request.stream_options and request.stream_options.include_usage:
                usage = UsageInfo(prompt_tokens=sum(num_prompt_tokens),
                                  completion_tokens=sum(num_tokens_sent.values()))
                usage.total_tokens = usage.prompt_tokens + usage.completion_tokens
                yield sse(CompletionStreamResponse(id=request_id, created=created, model=model,
                                                   choices=[], usage=usage))
        except (ValueError, RuntimeError) as exc:
            yield sse(error_from_exception(exc))
        finally:
            await results.aclose()  # type: ignore[attr-defined]
        yield SSE_DONE

    def _logprobs(self, completion: CompletionOutput, start: int, params: SamplingParams,
                  text_offset: int) -> CompletionLogProbs | None:
        if params.logprobs is None:
            return None
        result = CompletionLogProbs()
        for text, logprob, top in iter_logprobs(self.tokenizer, completion, start,
                                                params.logprobs):
            result.tokens.append(text)
            result.token_logprobs.append(logprob)
            top_dict = dict(top)
            if logprob is not None:
                top_dict.setdefault(text, logprob)
            result.top_logprobs.append(top_dict)
            result.text_offset.append(text_offset)
            text_offset += len(text)
        return result
