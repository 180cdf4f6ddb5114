"""Chat tools without a server: the Hermes parser on text and on a tokenizer's incremental
decode, tool_choice checks and the grammars of "required" and a named function, and how a
streamed choice turns into tool-call deltas."""

from __future__ import annotations

import json

import jsonschema
import pytest
from transformers import AutoTokenizer

from pagedllm.engine.input_processor import RequestFieldError
from pagedllm.entrypoints.openai.protocol import ChatCompletionRequest
from pagedllm.entrypoints.openai.tool_parsers import HermesToolParser, get_tool_parser
from pagedllm.entrypoints.openai.tools import ToolStream, plan_tools

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string"}, "unit": {"enum": ["c", "f"]}},
        "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time"}}  # no parameters


def chat(**kwargs) -> ChatCompletionRequest:
    return ChatCompletionRequest(messages=[{"role": "user", "content": "hi"}], **kwargs)


def test_hermes_parser_finds_calls_after_content():
    parser = HermesToolParser()
    text = ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}'
            '\n</tool_call>\n<tool_call>{"name": "get_time", "arguments": {}}</tool_call>')
    found = parser.extract(text)
    assert found.content == "Let me check."
    assert [(c.name, json.loads(c.arguments)) for c in found.calls] == [
        ("get_weather", {"city": "Oslo"}), ("get_time", {})]
    # Unclosed last call (the model stopped at EOS): still a call.
    found = parser.extract('<tool_call>{"name": "get_time", "arguments": {}}')
    assert found.content is None and [c.name for c in found.calls] == ["get_time"]
    # Not a call: plain text stays content.
    for plain in ("No tools needed.", "<tool_call>not json</tool_call>",
                  '<tool_call>{"arguments": {}}</tool_call>'):
        assert parser.extract(plain).calls == [] and parser.extract(plain).content == plain
    assert get_tool_parser("qwen").extract(text).calls
    with pytest.raises(ValueError, match="hermes"):
        get_tool_parser("nope")


def test_hermes_content_prefix_on_an_incremental_decode(tokenizer_dir):
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
    parser = HermesToolParser()
    text = 'Sure, <b>one</b> call: <tool_call>{"name": "get_time", "arguments": {}}</tool_call>'
    ids = tokenizer.encode(text)
    sent = ""
    for end in range(1, len(ids) + 1):
        partial = tokenizer.decode(ids[:end])
        prefix = parser.content_prefix(partial)
        assert prefix.startswith(sent) and "<tool_call" not in prefix
        sent = prefix
    assert sent == "Sure, <b>one</b> call: "
    assert parser.extract(tokenizer.decode(ids)).calls[0].name == "get_time"


def test_tool_choice_plans():
    assert plan_tools(chat(), None).mode == "none"
    assert plan_tools(chat(tools=[WEATHER], tool_choice="none"), None).mode == "none"
    parser = HermesToolParser()
    assert plan_tools(chat(tools=[WEATHER]), parser).mode == "auto"  # the default with tools
    named = plan_tools(chat(tools=[WEATHER, TIME], tool_choice={
        "type": "function", "function": {"name": "get_weather"}}), None)
    assert named.mode == "function" and named.function_name == "get_weather"
    assert named.constraint.json == WEATHER["function"]["parameters"]
    required = plan_tools(chat(tools=[WEATHER, TIME], tool_choice="required",
                               parallel_tool_calls=False), None)
    schema = required.constraint.json
    jsonschema.validate([{"name": "get_weather", "parameters": {"city": "Oslo"}}], schema)
    jsonschema.validate([{"name": "get_time", "parameters": {}}], schema)
    for bad in ([], [{"name": "get_weather", "parameters": {"unit": "c"}}],
                [{"name": "get_time", "parameters": {}}] * 2):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)


@pytest.mark.parametrize("kwargs, param, fragment", [
    ({"tools": [WEATHER]}, "tool_choice", "--enable-auto-tool-choice"),
    ({"tool_choice": "required"}, "tool_choice", "needs tools"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "x"}}},
     "tool_choice", "'x', which is not in tools"),
    ({"tools": [WEATHER], "tool_choice": "sometimes"}, "tool_choice", "sometimes"),
    ({"tools": [{"type": "function"}], "tool_choice": "required"}, "tools", "tools[0]"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": []}}],
      "tool_choice": "required"}, "tools", "parameters"),
])
def test_bad_tools_name_the_field(kwargs, param, fragment):
    with pytest.raises(RequestFieldError) as info:
        plan_tools(chat(**kwargs), None)
    assert info.value.param == param and fragment in str(info.value)


def test_streamed_deltas_join_to_the_calls():
    named = ToolStream(plan_tools(chat(tools=[WEATHER], tool_choice={
        "type": "function", "function": {"name": "get_weather"}}), None))
    pieces = []
    for text in ('{"ci', '{"city":"Oslo"', '{"city":"Oslo"}'):
        deltas, finish = named.deltas(text, None)
        pieces += deltas
    deltas, finish = named.deltas('{"city":"Oslo"}', "stop")
    pieces += deltas
    assert finish == "stop"  # a forced function ends as OpenAI ends it
    first = pieces[0].tool_calls[0]
    assert first.id.startswith("call_") and first.function.name == "get_weather"
    assert "".join(p.tool_calls[0].function.arguments for p in pieces) == '{"city":"Oslo"}'

    auto = ToolStream(plan_tools(chat(tools=[WEATHER]), HermesToolParser()))
    assert [d.content for d in auto.deltas("Checking <tool", None)[0]] == ["Checking "]
    assert auto.deltas('Checking <tool_call>{"name": "get_weather"', None)[0] == []
    deltas, finish = auto.deltas(
        'Checking <tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call>',
        "stop")
    assert finish == "tool_calls"
    assert deltas[0].tool_calls[0].function.name == "get_weather"
    assert json.loads(deltas[1].tool_calls[0].function.arguments) == {"city": "Oslo"}
    plain = ToolStream(plan_tools(chat(tools=[WEATHER]), HermesToolParser()))
    deltas, finish = plain.deltas("No call <", "stop")
    assert [d.content for d in deltas] == ["No call <"] and finish == "stop"
