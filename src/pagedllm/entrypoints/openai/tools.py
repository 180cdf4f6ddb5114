"""Chat `tools` and `tool_choice`: what a request's tools make of its output.

"none" leaves the text alone. "required" and a named function are enforced by a grammar:
the output is a JSON array of `{"name", "parameters"}` calls (each validating against its
tool's parameter schema), or the named function's arguments. "auto" lets the model choose and
parses its text with the server's tool call parser (`--enable-auto-tool-choice
--tool-call-parser NAME`).
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pagedllm.engine.input_processor import RequestFieldError
from pagedllm.entrypoints.openai.protocol import (
    DeltaFunctionCall,
    DeltaMessage,
    DeltaToolCall,
    FunctionCall,
    ToolCall,
)
from pagedllm.entrypoints.openai.tool_parsers import ParsedToolCall
from pagedllm.sampling_params import StructuredOutputsParams

if TYPE_CHECKING:
    from pagedllm.entrypoints.openai.protocol import ChatCompletionRequest
    from pagedllm.entrypoints.openai.tool_parsers import ToolParser

# Any object: the schema of a function that declares no parameters.
_ANY_OBJECT = {"type": "object"}


@dataclass
class ToolPlan:
    """How one chat request uses its tools."""

    # "none", "auto", "required" or "function" (one named function).
    mode: str
    # The grammar that enforces "required" or "function"; None otherwise.
    constraint: StructuredOutputsParams | None = None
    # The named function ("function" mode).
    function_name: str | None = None
    # The parser of the model's own calls ("auto" mode).
    parser: ToolParser | None = None

    def finish(self, text: str, finish_reason: str | None
               ) -> tuple[str | None, list[ParsedToolCall], str | None]:
        """A finished choice's (content, calls, finish_reason)."""
        calls: list[ParsedToolCall] = []
        content: str | None = text
        if self.mode == "function":
            calls, content = [ParsedToolCall(self.function_name, text)], None
        elif self.mode == "required":
            try:
                calls = [ParsedToolCall(c["name"], json.dumps(c["parameters"]))
                         for c in json.loads(text)]
                content = None
            except (ValueError, TypeError, KeyError):
                calls = []  # cut by max_tokens: the partial text stays content
        elif self.mode == "auto":
            extracted = self.parser.extract(text)
            content, calls = extracted.content, extracted.calls
        if calls and finish_reason == "stop" and self.mode != "function":
            # NOTE: as OpenAI: a forced named function ends with "stop".
            finish_reason = "tool_calls"
        return content, calls, finish_reason


def plan_tools(request: ChatCompletionRequest, parser: ToolParser | None) -> ToolPlan:
    """Checks `tools` and `tool_choice` (a RequestFieldError names the field); `parser` is the
    server's auto tool parser, None without --enable-auto-tool-choice."""
    tools = request.tools
    names = _check_tools(tools) if tools is not None else []
    choice = request.tool_choice
    if choice is None:
        choice = "auto" if tools else "none"
    if choice == "none":
        return ToolPlan("none")
    if not tools:
        raise RequestFieldError(f"tool_choice {choice!r} needs tools: give tools or drop "
                                f"tool_choice", param="tool_choice")
    if choice == "auto":
        if parser is None:
            raise RequestFieldError('"auto" tool choice needs the server started with '
                                    "--enable-auto-tool-choice and --tool-call-parser; set "
                                    'tool_choice to "required", a function or "none"',
                                    param="tool_choice")
        return ToolPlan("auto", parser=parser)
    schemas = {name: tool["function"].get("parameters") or _ANY_OBJECT
               for name, tool in zip(names, tools)}
    if choice == "required":
        calls = {"anyOf": [{
            "type": "object",
            "properties": {"name": {"enum": [name]}, "parameters": schema},
            "required": ["name", "parameters"], "additionalProperties": False,
        } for name, schema in schemas.items()]}
        array: dict[str, Any] = {"type": "array", "items": calls, "minItems": 1}
        if not request.parallel_tool_calls:
            array["maxItems"] = 1
        return ToolPlan("required", constraint=_compact(array))
    name = _named_function(choice)
    if name not in schemas:
        raise RequestFieldError(f"tool_choice names function {name!r}, which is not in tools "
                                f"({', '.join(names)})", param="tool_choice")
    return ToolPlan("function", constraint=_compact(schemas[name]), function_name=name)


def _compact(schema: dict[str, Any]) -> StructuredOutputsParams:
    # NOTE: calls are read by programs, and free whitespace lets a weak model pad forever.
    return StructuredOutputsParams(json=schema, disable_any_whitespace=True)


def _check_tools(tools: list[dict[str, Any]]) -> list[str]:
    names = []
    for index, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) else None
        if (tool.get("type", "function") != "function" or not isinstance(function, dict)
                or not isinstance(function.get("name"), str) or not function["name"]):
            raise RequestFieldError(
                f'tools[{index}] must be {{"type": "function", "function": {{"name": ..., '
                f'"parameters": {{...}}}}}}', param="tools")
        parameters = function.get("parameters")
        if parameters is not None and not isinstance(parameters, dict):
            raise RequestFieldError(f"tools[{index}].function.parameters must be a JSON schema "
                                    f"(an object)", param="tools")
        names.append(function["name"])
    return names


def _named_function(choice: Any) -> str:
    function = choice.get("function") if isinstance(choice, dict) else None
    if (not isinstance(function, dict) or choice.get("type", "function") != "function"
            or not isinstance(function.get("name"), str)):
        raise RequestFieldError(
            'tool_choice must be "none", "auto", "required" or {"type": "function", '
            f'"function": {{"name": ...}}}}, got {choice!r}', param="tool_choice")
    return function["name"]


def tool_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def tool_calls_out(calls: list[ParsedToolCall]) -> list[ToolCall]:
    return [ToolCall(id=tool_call_id(), function=FunctionCall(name=c.name, arguments=c.arguments))
            for c in calls]


@dataclass
class ToolStream:
    """One streamed choice under a tool plan: turns its growing text into deltas.

    A named function streams its arguments as they come (after a first delta with the id and
    name); "required" calls are sent once the choice ends; "auto" streams content up to what
    may start a call, and sends the calls at the end.
    """

    plan: ToolPlan
    _num_chars_sent: int = 0
    _call_id: str | None = None
    _calls: list[ParsedToolCall] = field(default_factory=list)

    def deltas(self, text: str, finish_reason: str | None) -> tuple[list[DeltaMessage], str | None]:
        """Deltas for the text so far, and the finish reason to send with the last one."""
        mode = self.plan.mode
        if mode == "function":
            deltas = []
            if self._call_id is None and (text or finish_reason):
                self._call_id = tool_call_id()
                deltas.append(DeltaMessage(tool_calls=[DeltaToolCall(
                    index=0, id=self._call_id, type="function",
                    function=DeltaFunctionCall(name=self.plan.function_name, arguments=""))]))
            if len(text) > self._num_chars_sent:
                deltas.append(DeltaMessage(tool_calls=[DeltaToolCall(
                    index=0, function=DeltaFunctionCall(arguments=text[self._num_chars_sent:]))]))
                self._num_chars_sent = len(text)
            return deltas, finish_reason
        if finish_reason is None:
            if mode != "auto":
                return [], None
            return self._content(self.plan.parser.content_prefix(text)), None
        _, calls, finish_reason = self.plan.finish(text, finish_reason)
        if not calls:
            return self._content(text), finish_reason
        deltas = []
        for index, call in enumerate(calls):
            deltas.append(DeltaMessage(tool_calls=[DeltaToolCall(
                index=index, id=tool_call_id(), type="function",
                function=DeltaFunctionCall(name=call.name, arguments=""))]))
            deltas.append(DeltaMessage(tool_calls=[DeltaToolCall(
                index=index, function=DeltaFunctionCall(arguments=call.arguments))]))
        return deltas, finish_reason

    def _content(self, text: str) -> list[DeltaMessage]:
        if len(text) <= self._num_chars_sent:
            return []
        delta = text[self._num_chars_sent:]
        self._num_chars_sent = len(text)
        return [DeltaMessage(content=delta)]
