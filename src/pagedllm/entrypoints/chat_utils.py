"""Chat conversations through a tokenizer's chat template: one place for `LLM.chat`, the
chat completions endpoint and `/tokenize`."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from pagedllm.engine.input_processor import RequestFieldError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from pagedllm.entrypoints.openai.protocol import ChatMessage


def render_chat(
    tokenizer: PreTrainedTokenizerBase,
    conversation: list[dict[str, Any]],
    chat_template: str | None,
    add_generation_prompt: bool = True,
    template_kwargs: dict[str, Any] | None = None,
) -> tuple[str, list[int]]:
    """A conversation as the chat template renders it, and its token ids: the text encoded
    without added special tokens (the template writes its own, as tokenize=True does). A
    template that fails on the conversation is a ValueError saying why."""
    try:
        text = tokenizer.apply_chat_template(
            conversation, chat_template=chat_template,
            add_generation_prompt=add_generation_prompt, tokenize=False,
            **(template_kwargs or {}),
        )
        return text, tokenizer.encode(text, add_special_tokens=False)
    except Exception as exc:  # noqa: BLE001 - a template's errors are the caller's to fix
        raise ValueError(f"the chat template failed: {type(exc).__name__}: {exc}") from None


def render_messages(
    tokenizer: PreTrainedTokenizerBase,
    messages: list[ChatMessage],
    chat_template: str | None,
    add_generation_prompt: bool = True,
    template_kwargs: dict | None = None,
) -> list[int]:
    """Token ids of a conversation of OpenAI chat messages under the chat template; a
    RequestFieldError (a ValueError naming `messages`) says what is wrong."""
    if chat_template is None and not tokenizer.chat_template:
        raise RequestFieldError("the model's tokenizer has no chat template: start the server "
                                "with --chat-template", "messages")
    conversation = []
    for index, message in enumerate(messages):
        content = message.content
        if isinstance(content, list):
            texts = []
            for part in content:
                if part.type != "text" or part.text is None:
                    raise RequestFieldError(
                        f"messages[{index}]: content part of type {part.type!r} is not "
                        "supported; only text parts are", "messages")
                texts.append(part.text)
            content = "\n".join(texts)
        # NOTE: "developer" is OpenAI's newer name for "system"; templates know only the latter.
        role = "system" if message.role == "developer" else message.role
        turn: dict[str, Any] = {"role": role, "content": content or ""}
        if message.name is not None:
            turn["name"] = message.name
        if message.tool_call_id is not None:
            turn["tool_call_id"] = message.tool_call_id
        if message.tool_calls:
            turn["tool_calls"] = [_call_for_template(call) for call in message.tool_calls]
        conversation.append(turn)
    try:
        _, token_ids = render_chat(tokenizer, conversation, chat_template,
                                   add_generation_prompt, template_kwargs)
    except ValueError as exc:
        raise RequestFieldError(f"{exc} (on these messages)", "messages") from None
    return token_ids


def _call_for_template(call: dict[str, Any]) -> dict[str, Any]:
    """An assistant turn's tool call as chat templates read it: OpenAI sends `arguments` as a
    JSON string, templates (Hermes, Qwen, Llama 3) index it as a mapping, as vLLM hands it."""
    function = call.get("function")
    if not isinstance(function, dict) or not isinstance(function.get("arguments"), str):
        return call
    try:
        arguments = json.loads(function["arguments"])
    except json.JSONDecodeError:
        return call
    return {**call, "function": {**function, "arguments": arguments}}
