"""POST /tokenize and /detokenize (vLLM's extensions), with the server's own tokenizer."""

from __future__ import annotations

from pagedllm.engine.input_processor import RequestFieldError
from pagedllm.entrypoints.chat_utils import render_messages
from pagedllm.entrypoints.openai.errors import error_from_exception
from pagedllm.entrypoints.openai.prompt_tokenizer import PromptTokenizer, encode_prompts
from pagedllm.entrypoints.openai.protocol import (
    DetokenizeRequest,
    DetokenizeResponse,
    ErrorResponse,
    TokenizeRequest,
    TokenizeResponse,
)
from pagedllm.entrypoints.openai.serving_models import OpenAIServingModels


class OpenAIServingTokenization:
    def __init__(self, models: OpenAIServingModels, tokenizer, chat_template: str | None,
                 prompt_tokenizer: PromptTokenizer) -> None:
        self.models = models
        self.tokenizer = tokenizer
        self.chat_template = chat_template
        self.prompt_tokenizer = prompt_tokenizer

    async def tokenize(self, request: TokenizeRequest) -> TokenizeResponse | ErrorResponse:
        error = self.models.check_model(request.model)
        if error is not None:
            return error
        try:
            if (request.prompt is None) == (request.messages is None):
                raise RequestFieldError("give exactly one of prompt and messages",
                                        param="prompt")
            if request.messages is not None:
                tokens = await self.prompt_tokenizer.run(
                    render_messages, request.messages, self.chat_template,
                    request.add_generation_prompt)
            else:
                tokens = (await self.prompt_tokenizer.run(
                    encode_prompts, [request.prompt], request.add_special_tokens))[0]
        except ValueError as exc:
            return error_from_exception(exc)
        token_strs = (self.tokenizer.convert_ids_to_tokens(tokens)
                      if request.return_token_strs else None)
        return TokenizeResponse(count=len(tokens), max_model_len=self.models.max_model_len,
                                tokens=tokens, token_strs=token_strs)

    def detokenize(self, request: DetokenizeRequest) -> DetokenizeResponse | ErrorResponse:
        error = self.models.check_model(request.model)
        if error is not None:
            return error
        vocab_size = len(self.tokenizer)
        bad = [t for t in request.tokens if not 0 <= t < vocab_size]
        if bad:
            return error_from_exception(RequestFieldError(
                f"token ids {bad[:10]} are outside the vocabulary [0, {vocab_size})",
                param="tokens"))
        return DetokenizeResponse(prompt=self.tokenizer.decode(request.tokens))
