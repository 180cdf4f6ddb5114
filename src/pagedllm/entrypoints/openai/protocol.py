"""Request and response bodies of the OpenAI-compatible API (pydantic), shaped like OpenAI's.

Requests ignore unknown fields (clients send many optional ones); fields that change the
meaning of a request and that we cannot honour are declared and refused by the serving layer.

NOTE: past the package's ~350 lines on purpose: it is declarations only, the wire format of
every endpoint in one place, as OpenAI's API reference is one document.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, model_serializer, model_validator
from pydantic_core import PydanticCustomError


def random_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


class OpenAIBaseModel(BaseModel):
    model_config = ConfigDict(extra="ignore")


def _check_unicode(body: Any) -> None:
    """Raises a validation error (a 400 naming the field) at the first string holding a lone
    surrogate (JSON can carry one as "\\ud800"; no tokenizer or UTF-8 encoder can take it).
    Iterative: bodies nest freely."""
    # (value, its path as a tuple of keys and indices); only strings and containers are pushed.
    stack: list[tuple[Any, tuple]] = [(body, ())]
    while stack:
        value, path = stack.pop()
        if isinstance(value, str):
            _check_text(value, path)
        elif isinstance(value, dict):
            for key, item in value.items():
                _check_text(key, path)
                if isinstance(item, (str, dict, list)):
                    stack.append((item, (*path, key)))
        elif isinstance(value, list):
            stack.extend((item, (*path, index)) for index, item in enumerate(value)
                         if isinstance(item, (str, dict, list)))


def _check_text(text: Any, path: tuple) -> None:
    if not isinstance(text, str):
        return
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in path).lstrip(".")
        raise PydanticCustomError(
            "invalid_unicode",
            "{where}: the text is not valid Unicode: it holds a lone surrogate at character "
            "{start}",
            {"where": where or "the body", "start": exc.start, "param": path[0] if path else None},
        ) from None


class RequestBody(OpenAIBaseModel):
    """A request body: every string in it must be valid Unicode."""

    @model_validator(mode="before")
    @classmethod
    def _valid_unicode(cls, data: Any) -> Any:
        _check_unicode(data)
        return data


# ---- errors -------------------------------------------------------------------------------

class ErrorInfo(OpenAIBaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | int | None = None


class ErrorResponse(OpenAIBaseModel):
    """`{"error": {...}}`; `status_code` is the HTTP status and is not part of the body."""

    error: ErrorInfo
    status_code: int = Field(default=400, exclude=True)


_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    500: "server_error",
    503: "service_unavailable_error",
}


def make_error(
    message: str, status_code: int = 400, param: str | None = None, code: str | None = None
) -> ErrorResponse:
    err_type = _ERROR_TYPES.get(status_code, "invalid_request_error")
    return ErrorResponse(
        error=ErrorInfo(message=message, type=err_type, param=param, code=code),
        status_code=status_code,
    )


# ---- shared pieces ------------------------------------------------------------------------

class StreamOptions(OpenAIBaseModel):
    include_usage: bool = False


class UsageInfo(OpenAIBaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class SamplingExtras(RequestBody):
    """vLLM's sampling extensions, accepted by both completion endpoints (via `extra_body`),
    and the fields both endpoints share."""

    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool = False
    min_tokens: int = 0
    stop_token_ids: list[StrictInt] | None = None
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    # Beam search instead of sampling: `n` is the beam width and the `n` beams come back best
    # first; finished beams are ranked by cumulative logprob / length ** length_penalty.
    use_beam_search: bool = False
    length_penalty: float = 1.0
    # A constraint on the output: OpenAI's `{"type": "json_object"}` or `{"type":
    # "json_schema", "json_schema": {"name", "schema", "strict"}}` ("text" is none), or
    # vLLM's `structured_outputs` (StructuredOutputsParams' fields); at most one of the two.
    response_format: dict[str, Any] | None = None
    structured_outputs: dict[str, Any] | None = None


# ---- /v1/completions ----------------------------------------------------------------------

class CompletionRequest(SamplingExtras):
    model: str | None = None
    # A string, a list of strings, token ids, or a list of token-id lists.
    # NOTE: strict ints: JSON true/false are not token ids.
    prompt: list[StrictInt] | list[list[StrictInt]] | str | list[str]
    best_of: int | None = None
    echo: bool = False
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    logprobs: int | None = None
    max_tokens: int | None = 16
    n: int = 1
    presence_penalty: float = 0.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    suffix: str | None = None
    temperature: float | None = None
    top_p: float | None = None
    user: str | None = None


class CompletionLogProbs(OpenAIBaseModel):
    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)


class CompletionResponseChoice(OpenAIBaseModel):
    index: int
    text: str
    logprobs: CompletionLogProbs | None = None
    finish_reason: str | None = None
    # The stop string or stop token id that ended the choice (vLLM's extension).
    stop_reason: int | str | None = None


class CompletionResponse(OpenAIBaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionResponseChoice]
    usage: UsageInfo | None = None


class CompletionStreamResponse(CompletionResponse):
    pass


# ---- /v1/chat/completions -----------------------------------------------------------------

class ContentPart(OpenAIBaseModel):
    type: str
    text: str | None = None


class ChatMessage(OpenAIBaseModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    # An assistant turn's calls, and the call a "tool" turn answers.
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None


class ChatCompletionRequest(SamplingExtras):
    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    n: int = 1
    presence_penalty: float = 0.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = None
    top_p: float | None = None
    # OpenAI's function tools: [{"type": "function", "function": {"name", "description",
    # "parameters"}}]; tool_choice "none", "auto", "required" or {"type": "function",
    # "function": {"name": ...}} (default "auto" with tools, else "none").
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool = True
    user: str | None = None
    # vLLM's extensions for the chat template.
    add_generation_prompt: bool = True
    chat_template_kwargs: dict[str, Any] | None = None


class FunctionCall(OpenAIBaseModel):
    name: str
    # The arguments as JSON text.
    arguments: str


class ToolCall(OpenAIBaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessageOut(OpenAIBaseModel):
    role: Literal["assistant"] = "assistant"
    # None when the message is only tool calls.
    content: str | None
    tool_calls: list[ToolCall] = Field(default_factory=list)


class DeltaFunctionCall(OpenAIBaseModel):
    name: str | None = None
    arguments: str | None = None

    @model_serializer(mode="wrap")
    def _drop_nulls(self, handler: Any) -> dict[str, Any]:
        return {k: v for k, v in handler(self).items() if v is not None}


class DeltaToolCall(OpenAIBaseModel):
    """A piece of a streamed call: the first carries id, type and name; the rest, arguments."""

    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: DeltaFunctionCall

    @model_serializer(mode="wrap")
    def _drop_nulls(self, handler: Any) -> dict[str, Any]:
        return {k: v for k, v in handler(self).items() if v is not None}


class DeltaMessage(OpenAIBaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[DeltaToolCall] | None = None

    @model_serializer(mode="wrap")
    def _drop_nulls(self, handler: Any) -> dict[str, Any]:
        return {k: v for k, v in handler(self).items() if v is not None}


class ChatTopLogprob(OpenAIBaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(ChatTopLogprob):
    top_logprobs: list[ChatTopLogprob] = Field(default_factory=list)


class ChatLogprobs(OpenAIBaseModel):
    content: list[ChatTokenLogprob] | None = None


class ChatCompletionChoice(OpenAIBaseModel):
    index: int
    message: ChatMessageOut
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionResponse(OpenAIBaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatCompletionChoice]
    usage: UsageInfo | None = None


class ChatCompletionStreamChoice(OpenAIBaseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionStreamResponse(OpenAIBaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatCompletionStreamChoice]
    usage: UsageInfo | None = None


# ---- models, tokenizer --------------------------------------------------------------------

class ModelCard(OpenAIBaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "pagedllm"
    root: str | None = None
    max_model_len: int | None = None


class ModelList(OpenAIBaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard] = Field(default_factory=list)


class TokenizeRequest(RequestBody):
    """Either `prompt` (plain text) or `messages` (run through the chat template)."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True
    return_token_strs: bool = False


class TokenizeResponse(OpenAIBaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(RequestBody):
    model: str | None = None
    tokens: list[StrictInt]


class DetokenizeResponse(OpenAIBaseModel):
    prompt: str
