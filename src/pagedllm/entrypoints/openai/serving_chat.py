"""POST /v1/chat/completions: messages through the chat template, then one engine request."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from pagedllm.engine.input_processor import RequestFieldError
from pagedllm.entrypoints.chat_utils import render_messages
from pagedllm.entrypoints.openai.errors import aborted_error, error_from_exception
from pagedllm.entrypoints.openai.logprobs import iter_logprobs
from pagedllm.entrypoints.openai.prompt_tokenizer import PromptTokenizer
from pagedllm.entrypoints.openai.protocol import (
    ChatCompletionChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatCompletionStreamChoice,
    ChatCompletionStreamResponse,
    ChatLogprobs,
    ChatMessageOut,
    ChatTokenLogprob,
    ChatTopLogprob,
    DeltaMessage,
    ErrorResponse,
    UsageInfo,
    random_id,
)
from pagedllm.entrypoints.openai.request_params import (
    MAX_LOGPROBS,
    build_sampling_params,
    check_stream_options,
    process_prompt,
)
from pagedllm.entrypoints.openai.serving_engine import OpenAIServing
from pagedllm.entrypoints.openai.serving_models import OpenAIServingModels
from pagedllm.entrypoints.openai.streaming import SSE_DONE, sse
from pagedllm.entrypoints.openai.tools import ToolPlan, ToolStream, plan_tools, tool_calls_out
from pagedllm.outputs import CompletionOutput, RequestOutput
from pagedllm.sampling_params import SamplingParams

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from pagedllm.engine.async_engine import AsyncLLMEngine
    from pagedllm.entrypoints.openai.tool_parsers import ToolParser

# SamplingParams field -> the chat request field a user sets for it.
_CHAT_PARAM_NAMES = {"logprobs": "top_logprobs", "max_tokens": "max_completion_tokens"}


class OpenAIServingChat(OpenAIServing):
    """One engine request per call; `n` choices come from `RequestOutput.outputs`.

    With `use_beam_search` the choices are the `n` beams, best first; a stream sends each beam
    whole, once the search has ended (as vLLM does). With `tools`, a choice may come back as
    tool calls (see `tools.py`); `tool_parser` parses the model's own calls for tool_choice
    "auto" (None: "auto" is refused).
    """

    def __init__(
        self,
        engine: AsyncLLMEngine,
        models: OpenAIServingModels,
        tokenizer: PreTrainedTokenizerBase,
        chat_template: str | None,
        prompt_tokenizer: PromptTokenizer,
        tool_parser: ToolParser | None = None,
    ) -> None:
        super().__init__(engine, models, tokenizer, prompt_tokenizer)
        self.chat_template = chat_template
        self.tool_parser = tool_parser

    async def create_chat_completion(
        self, request: ChatCompletionRequest
    ) -> ChatCompletionResponse | ErrorResponse | AsyncIterator[str]:
        error = self.models.check_model(request.model)
        if error is not None:
            return error
        try:
            plan = plan_tools(request, self.tool_parser)
            params = self._sampling_params(request, plan)
            template_kwargs = request.chat_template_kwargs
            if request.tools:  # the template shows the model its tools, if it knows how
                template_kwargs = {"tools": request.tools, **(template_kwargs or {})}
            token_ids = await self.prompt_tokenizer.run(
                render_messages, request.messages, self.chat_template,
                request.add_generation_prompt, template_kwargs)
            processed = process_prompt(
                self.engine, request, params, request.n, token_ids, None, "messages",
                param="messages", structured_param="tools" if plan.constraint else None)
        except ValueError as exc:
            return error_from_exception(exc, _CHAT_PARAM_NAMES)
        request_id = random_id("chatcmpl")
        results = self.engine.generate(processed, None, request_id)
        model = self.models.model_name(request.model)
        if request.stream:
            return self._stream(request, request_id, model, params, plan, results)
        return await self._full(request_id, model, params, plan, results)

    def _sampling_params(self, request: ChatCompletionRequest, plan: ToolPlan
                         ) -> SamplingParams:
        check_stream_options(request.stream, request.stream_options)
        if request.top_logprobs is not None and not request.logprobs:
            raise RequestFieldError("top_logprobs needs logprobs=true",
                                    param="top_logprobs")
        if request.top_logprobs is not None and request.top_logprobs > MAX_LOGPROBS:
            raise RequestFieldError(f"top_logprobs must be at most {MAX_LOGPROBS}, got "
                                    f"{request.top_logprobs}", param="top_logprobs")
        max_tokens = request.max_completion_tokens
        if max_tokens is None:
            max_tokens = request.max_tokens
        return build_sampling_params(
            request, max_num_seqs=self.engine.max_num_seqs, n=request.n, max_tokens=max_tokens,
            logprobs=(request.top_logprobs or 0) if request.logprobs else None,
            temperature=request.temperature, top_p=request.top_p, seed=request.seed,
            stop=request.stop, presence_penalty=request.presence_penalty,
            frequency_penalty=request.frequency_penalty, logit_bias=request.logit_bias,
            tool_constraint=plan.constraint,
        )

    async def _full(
        self,
        request_id: str,
        model: str,
        params: SamplingParams,
        plan: ToolPlan,
        results: AsyncIterator[RequestOutput],
    ) -> ChatCompletionResponse | ErrorResponse:
        final: RequestOutput | None = None
        try:
            async for output in results:
                final = output
        except (ValueError, RuntimeError) as exc:
            return error_from_exception(exc)
        assert final is not None
        aborted = aborted_error([final])
        if aborted is not None:
            return aborted
        choices = []
        for completion in sorted(final.outputs, key=lambda c: c.index):
            content, calls, finish_reason = plan.finish(completion.text, completion.finish_reason)
            choices.append(ChatCompletionChoice(
                index=completion.index,
                message=ChatMessageOut(content=content, tool_calls=tool_calls_out(calls)),
                logprobs=self._logprobs(completion, 0, params),
                finish_reason=finish_reason,
                stop_reason=completion.stop_reason,
            ))
        num_completion = sum(len(c.token_ids) for c in final.outputs)
        usage = UsageInfo(prompt_tokens=len(final.prompt_token_ids),
                          completion_tokens=num_completion,
                          total_tokens=len(final.prompt_token_ids) + num_completion)
        return ChatCompletionResponse(id=request_id, model=model, choices=choices, usage=usage)

    async def _stream(
        self,
        request: ChatCompletionRequest,
        request_id: str,
        model: str,
        params: SamplingParams,
        plan: ToolPlan,
        results: AsyncIterator[RequestOutput],
    ) -> AsyncIterator[str]:
        created = int(time.time())

        def chunk(choices: list[ChatCompletionStreamChoice], usage: UsageInfo | None = None
                  ) -> str:
            return sse(ChatCompletionStreamResponse(id=request_id, created=created, model=model,
                                                    choices=choices, usage=usage))

        num_chars_sent: dict[int, int] = {}
        num_tokens_sent: dict[int, int] = {}
        num_prompt_tokens = 0
        done: set[int] = set()
        tools: dict[int, ToolStream] = {}  # per choice, with a tool plan
        try:
            # The role comes first, once per choice, before any token (as OpenAI does).
            for index in range(request.n):
                yield chunk([ChatCompletionStreamChoice(
                    index=index, delta=DeltaMessage(role="assistant", content=""))])
            async for output in results:
                num_prompt_tokens = len(output.prompt_token_ids)
                for completion in output.outputs:
                    index = completion.index
                    if index in done:
                        continue
                    if plan.mode != "none":
                        for piece in self._tool_chunks(tools.setdefault(index, ToolStream(plan)),
                                                       completion, num_tokens_sent, params):
                            yield chunk([piece])
                        if completion.finish_reason is not None:
                            done.add(index)
                        continue
                    delta = completion.text[num_chars_sent.get(index, 0):]
                    if not delta and completion.finish_reason is None:
                        continue  # tokens whose text is held back: send them with the text
                    logprobs = self._logprobs(completion, num_tokens_sent.get(index, 0), params)
                    num_chars_sent[index] = len(completion.text)
                    num_tokens_sent[index] = len(completion.token_ids)
                    if completion.finish_reason is not None:
                        done.add(index)
                    yield chunk([ChatCompletionStreamChoice(
                        index=index, delta=DeltaMessage(content=delta), logprobs=logprobs,
                        finish_reason=completion.finish_reason,
                        stop_reason=completion.stop_reason,
                    )])
            if request.stream_options and request.stream_options.include_usage:
                num_completion = sum(num_tokens_sent.values())
                yield chunk([], UsageInfo(prompt_tokens=num_prompt_tokens,
                                          completion_tokens=num_completion,
                                          total_tokens=num_prompt_tokens + num_completion))
        except (ValueError, RuntimeError) as exc:
            yield sse(error_from_exception(exc))
        finally:
            await results.aclose()  # type: ignore[attr-defined]
        yield SSE_DONE

    def _tool_chunks(self, stream: ToolStream, completion: CompletionOutput,
                     num_tokens_sent: dict[int, int], params: SamplingParams
                     ) -> list[ChatCompletionStreamChoice]:
        """A choice's stream pieces under a tool plan; the step's logprobs ride on the first."""
        deltas, finish_reason = stream.deltas(completion.text, completion.finish_reason)
        if not deltas and finish_reason is None:
            return []  # held back (a call may be starting): sent with what follows
        index = completion.index
        logprobs = self._logprobs(completion, num_tokens_sent.get(index, 0), params)
        num_tokens_sent[index] = len(completion.token_ids)
        deltas = deltas or [DeltaMessage()]
        return [ChatCompletionStreamChoice(
            index=index, delta=delta, logprobs=logprobs if i == 0 else None,
            finish_reason=finish_reason if i == len(deltas) - 1 else None,
            stop_reason=completion.stop_reason if i == len(deltas) - 1 else None,
        ) for i, delta in enumerate(deltas)]

    def _logprobs(self, completion: CompletionOutput, start: int, params: SamplingParams
                  ) -> ChatLogprobs | None:
        if params.logprobs is None:
            return None
        content = []
        for text, logprob, top in iter_logprobs(self.tokenizer, completion, start,
                                                params.logprobs):
            content.append(ChatTokenLogprob(
                token=text,
                logprob=logprob if logprob is not None else 0.0,
                bytes=list(text.encode("utf-8")),
                top_logprobs=[ChatTopLogprob(token=t, logprob=lp, bytes=list(t.encode("utf-8")))
                              for t, lp in top],
            ))
        return ChatLogprobs(content=content)
