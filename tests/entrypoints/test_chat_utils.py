"""Chat messages reach the template with their tool calls, the calls' answers and names."""

from __future__ import annotations

from transformers import AutoTokenizer

from pagedllm.entrypoints.chat_utils import render_messages
from pagedllm.entrypoints.openai.protocol import ChatMessage

TEMPLATE = (
    "{% for m in messages %}<{{ m.role }}{% if m.name %}:{{ m.name }}{% endif %}>"
    "{% if m.tool_calls %}{% for c in m.tool_calls %}[{{ c.function.name }}"
    "({{ c.function.arguments.city }})]{% endfor %}{% endif %}"
    "{% if m.tool_call_id %}#{{ m.tool_call_id }}{% endif %}{{ m.content }}{% endfor %}"
)


def test_tool_turns_reach_the_template(tokenizer_dir):
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    messages = [
        ChatMessage(role="user", content="Weather in Paris?", name="ana"),
        ChatMessage(role="assistant", content=None, tool_calls=[{
            "id": "call_1", "type": "function",
            "function": {"name": "weather", "arguments": '{"city": "Paris"}'}}]),
        ChatMessage(role="tool", content="sunny", tool_call_id="call_1"),
    ]
    ids = render_messages(tokenizer, messages, TEMPLATE, add_generation_prompt=False)
    assert tokenizer.decode(ids) == "<user:ana>Weather in Paris?<assistant>[weather(Paris)]" \
                                    "<tool>#call_1sunny"
