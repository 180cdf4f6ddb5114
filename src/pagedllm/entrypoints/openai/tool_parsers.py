"""Tool calls in a chat model's text: parsers by name (`--tool-call-parser`), for `tool_choice`
"auto", where the model decides to call a tool by writing the call in its own format.

A parser finds the calls in the whole text (`extract`) and, for streaming, says how much of a
partial text is surely plain content (`content_prefix`): the rest may start a call.
"""

from __future__ import annotations

import json
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass


@dataclass
class ParsedToolCall:
    name: str
    # The arguments as a JSON text (OpenAI's `function.arguments`).
    arguments: str


@dataclass
class ExtractedToolCalls:
    """What a parser found: the plain text before the calls (None when there is none) and
    the calls, in order (empty: the text is plain content)."""

    content: str | None
    calls: list[ParsedToolCall]


class ToolParser(ABC):
    """Finds tool calls in the text of one choice."""

    @abstractmethod
    def extract(self, text: str) -> ExtractedToolCalls:
        """The calls in a finished text; text that is not a well-formed call stays content."""

    @abstractmethod
    def content_prefix(self, text: str) -> str:
        """The longest prefix of a partial `text` that is content whatever follows."""


class HermesToolParser(ToolParser):
    """Hermes / Qwen: each call is `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`,
    after optional plain text; a last call may lack its closing tag (cut by EOS)."""

    START, END = "<tool_call>", "</tool_call>"
    _CALL = re.compile(r"<tool_call>(.*?)(?:</tool_call>|$)", re.DOTALL)

    def extract(self, text: str) -> ExtractedToolCalls:
        start = text.find(self.START)
        if start < 0:
            return ExtractedToolCalls(text, [])
        calls = []
        for match in self._CALL.finditer(text, start):
            try:
                call = json.loads(match.group(1))
            except ValueError:
                return ExtractedToolCalls(text, [])
            if not (isinstance(call, dict) and isinstance(call.get("name"), str)):
                return ExtractedToolCalls(text, [])
            arguments = call.get("arguments", call.get("parameters", {}))
            calls.append(ParsedToolCall(call["name"], json.dumps(arguments)))
        content = text[:start].strip()
        return ExtractedToolCalls(content or None, calls)

    def content_prefix(self, text: str) -> str:
        start = text.find(self.START)
        if start >= 0:
            return text[:start]
        # Hold back a tail that may be the tag's beginning: "Sure <tool" -> "Sure ".
        for size in range(min(len(self.START) - 1, len(text)), 0, -1):
            if self.START.startswith(text[-size:]):
                return text[:-size]
        return text


# Parser name -> class; `--tool-call-parser` takes these names ("qwen" writes Hermes calls).
TOOL_PARSERS: dict[str, type[ToolParser]] = {"hermes": HermesToolParser, "qwen": HermesToolParser}


def get_tool_parser(name: str) -> ToolParser:
    if name not in TOOL_PARSERS:
        raise ValueError(f"unknown tool call parser {name!r}: choose one of "
                         f"{', '.join(TOOL_PARSERS)}")
    return TOOL_PARSERS[name]()
